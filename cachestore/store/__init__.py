"""The store on disk, torch-free: the record format and entry layouts, the item ids and catalogue, the LMDB build,
publication, the readers and the store checks."""
