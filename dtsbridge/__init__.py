"""dtsbridge: completes KBase DTS transfers into users' datastores."""

__version__ = "0.1.0"
