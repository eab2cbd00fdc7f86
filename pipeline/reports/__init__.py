"""Reports: store size, capacity planning, model analysis and the HTML report."""
