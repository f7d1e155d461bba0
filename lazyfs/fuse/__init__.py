"""FUSE filesystems: the whole RAFS tree (fuse mode) or only blob data devices (erofs mode)."""
