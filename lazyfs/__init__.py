"""lazyfs: lazy-loading Nydus (RAFS v6) images and peer-to-peer image distribution."""

__version__ = "0.1.0"
