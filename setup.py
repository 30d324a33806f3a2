"""The package list, which pyproject.toml cannot express: `mbert_retrieval` with its subpackages,
and the repository's top-level `evaluation/` folder installed as `mbert_retrieval.evaluation` (so the
wheel adds no top-level `evaluation` package, a name another distribution uses). Everything else
is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["mbert_retrieval", "mbert_retrieval.*"]),
        "mbert_retrieval.evaluation",
    ],
    package_dir={"mbert_retrieval.evaluation": "evaluation"},
)
