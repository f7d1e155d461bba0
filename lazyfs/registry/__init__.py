"""OCI / Docker registry client: references, auth, manifests, blob transfer and layer streams."""
