"""Conversion of OCI/Docker images into Nydus images (nydusify's job)."""
