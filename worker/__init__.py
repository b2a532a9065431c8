"""wxphone: resolve WeChat Mini Program phone codes into verified phone numbers in PostgreSQL."""

__version__ = "0.1.0"
