"""requirements.txt picks the stack by Python version (environment markers); requirements-current.txt is
the current stack on any Python and equals requirements.txt wherever the latter picks the current stack."""
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parents[1]


def resolved(name: str, python: str) -> dict:
    """{package: specifier} of a requirements file for one Python version (markers evaluated)."""
    out = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"python_version": python,
                                                      "python_full_version": python + ".0"}):
            key = req.name.lower()
            assert key not in out, f"{name}: {req.name} is listed twice for Python {python}"
            out[key] = req.specifier
    return out


@pytest.mark.parametrize("python", ["3.12", "3.13"])
def test_current_file_equals_requirements_where_that_picks_the_current_stack(python):
    assert resolved("requirements-current.txt", python) == resolved("requirements.txt", python)


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_each_stack_admits_what_it_was_verified_with_and_nothing_known_broken(python):
    pinned = python == "3.11"
    for name in ("requirements.txt", "requirements-current.txt"):
        req = resolved(name, python)
        current = name == "requirements-current.txt" or not pinned
        if current:
            assert req["numpy"].contains("2.4.6") and not req["numpy"].contains("1.26.4")
            assert req["pillow"].contains("13.0.0") and req["pillow"].contains("12.3.0")
            assert not req["pillow"].contains("11.3.0") and not req["pillow"].contains("9.5.0")
        else:
            assert set(req["numpy"]) == set(Requirement("numpy==1.23.5").specifier)
            assert set(req["pillow"]) == set(Requirement("Pillow==9.5.0").specifier)
        if pinned:  # one torch per Python version: both environments share qsegformers/_C.cpython-311-*.so
            assert str(req["torch"]) == "==2.13.0" and str(req["torchvision"]) == "==0.28.0"
        else:
            for good in ("2.11.0", "2.13.0", "2.14.1"):
                assert req["torch"].contains(good)
            # torchvision 0.29 asks only torch>=2.14: without the bound pip pairs it with torch 2.15
            assert not req["torch"].contains("2.15.0") and not req["torch"].contains("2.10.0")
            assert req["torchvision"].contains("0.26.0") and req["torchvision"].contains("0.29.1")
            assert not req["torchvision"].contains("0.30.0")
