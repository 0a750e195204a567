"""conflayers compiler: searches skip profiles and writes bundles (needs torch + transformers)."""
__version__ = "0.1.0"
