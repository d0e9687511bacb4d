"""The ``twistd dtsbridge`` plugin: names the module, imports nothing heavy."""

from twisted.application.service import ServiceMaker

dtsbridge = ServiceMaker(
    "dtsbridge",
    "dtsbridge.tap",
    "Complete KBase DTS transfers into users' datastores",
    "dtsbridge",
)
