"""Map the repository's top-level folders into the single ``heteroserve`` namespace.

``core/`` -> ``heteroserve.core``, ``platforms/`` -> ``heteroserve.platforms``, and so on, so
nothing installs a generic top-level name. Subpackages are discovered, not listed by hand.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "heteroserve": "heteroserve",
    "heteroserve.core": "core",
    "heteroserve.platforms": "platforms",
    "heteroserve.server": "server",
    "heteroserve.conformance": "conformance",
}

packages = []
for package, folder in FOLDERS.items():
    packages.append(package)
    if package != "heteroserve":
        packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=FOLDERS,
      package_data={"heteroserve.server": ["assets/*"], "heteroserve.conformance": ["*.md"],
                    "heteroserve.platforms.triton": ["moe_tuned/*.json", "w4_gemv_tuned/*.json"]})
