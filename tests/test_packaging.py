"""Packaging: what an install pulls in, the Comfy Registry metadata, the publish workflow, shipped workflows.

- requirements.txt (what ComfyUI-Manager installs into ComfyUI's environment) equals [project].dependencies
  minus torch, and lists exactly the distributions the nodes import, found by reading every import
  (function-level ones too) of nodes/**/*.py and of every zerocon_core module they reach. diffusers is not
  among them: it belongs to the ``cli`` extra.
- pyproject.toml follows the Registry's pyproject specification; ``comfy node validate`` passes when
  comfy-cli is installed (``COMFY_CLI`` names its executable, else ``comfy`` on PATH).
- .github/workflows/publish.yml publishes with the official action only when the version changed (its
  version check is run here on throwaway git repositories).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Provided by ComfyUI itself (its own modules), never installed by the pack.
COMFYUI_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_execution",
    "comfy_extras",
    "comfyui_version",
    "execution",
    "folder_paths",
    "latent_preview",
    "node_helpers",
    "nodes",
    "server",
}
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"PIL": "pillow"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("Pillow>=10.0" -> "pillow")."""
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_requirements_txt_equals_project_dependencies_without_torch():
    deps = PYPROJECT["project"]["dependencies"]
    assert sorted(_requirements()) == sorted(d for d in deps if _name(d) != "torch")
    assert any(_name(d) == "torch" for d in deps), "the pip install of the CLI needs torch"
    assert not any(_name(r) == "torch" for r in _requirements()), "never let ComfyUI-Manager replace ComfyUI's torch"


def test_diffusers_is_only_in_the_cli_extra_and_the_test_extra_includes_it():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "diffusers" in {_name(r) for r in extras["cli"]}
    assert "diffusers" not in {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert f"{PYPROJECT['project']['name']}[cli]" in extras["test"]


def _module_files(base: Path, dotted: str, names: list[str]) -> set[Path]:
    """The .py files a relative ``from <base>.<dotted> import names`` reaches (a package's __init__ and its
    submodules named in ``names``)."""
    target = base.joinpath(*dotted.split(".")) if dotted else base
    files = {target.with_suffix(".py")} if target.with_suffix(".py").is_file() else set()
    if (target / "__init__.py").is_file():
        files.add(target / "__init__.py")
        files |= {target / f"{n}.py" for n in names if (target / f"{n}.py").is_file()}
    return files


def _imports(path: Path) -> tuple[set[str], set[Path]]:
    """(top-level absolute imports, zerocon_core files reached by relative imports) of one file, every
    import statement included (module level and inside functions)."""
    absolute: set[str] = set()
    core: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.add(node.module.split(".")[0])
                continue
            base = path.parent.parents[node.level - 2] if node.level > 1 else path.parent
            reached = _module_files(base, node.module or "", [a.name for a in node.names])
            core |= {f for f in reached if (ROOT / "zerocon_core") in f.parents}
    return absolute, core


def _stem(path: Path) -> str:
    return path.parent.name if path.name == "__init__.py" else path.stem


def node_side_imports() -> tuple[set[str], set[str]]:
    """(third-party top-level modules, zerocon_core module names) the node side can import, transitively."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    third: set[str] = set()
    todo: set[Path] = set()
    for path in sorted((ROOT / "nodes").rglob("*.py")):  # nodes/families/ too
        absolute, core = _imports(path)
        third |= absolute
        todo |= core
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for parent in path.parents:  # importing a.b.c runs a/__init__ and a/b/__init__ first
            if parent == ROOT:
                break
            todo |= {parent / "__init__.py"} - seen
        absolute, core = _imports(path)
        third |= absolute
        todo |= core - seen
    return {m for m in third - stdlib - COMFYUI_MODULES}, {_stem(p) for p in seen}


def test_the_scan_sees_function_level_imports(tmp_path):
    """The scan would see a lazy ``from diffusers import ...`` inside a function (the way a regression would come)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from diffusers import DDIMScheduler\n    import numpy as np\n")
    assert _imports(f)[0] == {"diffusers", "numpy"}


def test_requirements_list_exactly_what_the_nodes_import():
    third, core = node_side_imports()
    assert {"captioning", "dino", "metrics", "model_folders", "sampler"} <= core, core
    assert "diffusers" not in third, "a module the nodes reach imports diffusers; it is only in the cli extra"
    assert not {"pipeline", "cli", "diffusers_host", "evaluate"} & core, core
    imported = {DISTRIBUTIONS.get(m, m).lower().replace("_", "-") for m in third}
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert imported == declared, (
        f"imported but not declared: {imported - declared}; declared, never imported: {declared - imported}"
    )


# ---------------------------------------------------------------------------------------------------------
# Comfy Registry metadata (the pyproject specification of the Registry's documentation)

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_ACCELERATORS = {
    "GPU :: NVIDIA CUDA",
    "GPU :: AMD ROCm",
    "GPU :: Intel Arc",
    "NPU :: Huawei Ascend",
    "GPU :: Apple Metal",
}


def test_pyproject_follows_the_registry_specification():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and _NAME.match(name) and "comfyui" not in name.lower(), name
    assert _SEMVER.match(project["version"]), project["version"]
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["description"] and project["requires-python"]
    urls = project["urls"]
    for key in ("Repository", "Homepage", "Documentation", "Issues"):
        assert urls[key].startswith("https://github.com/zerocon/ComfyUI-ZeroCon"), key
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.match(r"^https://.+\.(png|jpg|svg|gif)$", comfy["Icon"]), comfy["Icon"]
    assert comfy["Icon"].endswith("/main/docs/icon.png") and (ROOT / "docs" / "icon.png").is_file()
    assert re.match(r"^>=\d+\.\d+\.\d+$", comfy["requires-comfyui"])
    assert project["version"] == _module_version(), "pyproject.toml and zerocon_core.__version__ disagree"


def test_classifiers_claim_no_single_accelerator():
    """The pack runs wherever ComfyUI runs (CPU, CUDA, ROCm, MPS): no Environment classifier may narrow that."""
    classifiers = PYPROJECT["project"]["classifiers"]
    assert "Operating System :: OS Independent" in classifiers
    environment = [c for c in classifiers if c.startswith("Environment ::")]
    assert not environment, environment
    assert _ACCELERATORS  # the values the Registry would read as "only these devices"


def _module_version() -> str:
    text = (ROOT / "zerocon_core" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _comfy_cli() -> str | None:
    return os.environ.get("COMFY_CLI") or shutil.which("comfy")


@pytest.mark.skipif(_comfy_cli() is None, reason="comfy-cli not installed (pip install comfy-cli; or set COMFY_CLI)")
def test_comfy_node_validate_passes(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), COMFY_CLI_DISABLE_TRACKING="1")
    proc = subprocess.run(
        [_comfy_cli(), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "All validation checks passed" in out and "Warning" not in out, out


# ---------------------------------------------------------------------------------------------------------
# .github/workflows/publish.yml

WORKFLOW = ROOT / ".github" / "workflows" / "publish.yml"


@pytest.fixture(scope="module")
def publish():
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(WORKFLOW.read_text())


def test_publish_runs_on_pyproject_changes_on_main(publish):
    on = publish[True] if True in publish else publish["on"]  # YAML 1.1 reads a bare `on` as True
    assert on["push"]["branches"] == ["main"] and on["push"]["paths"] == ["pyproject.toml"]
    assert "workflow_dispatch" in on
    steps = publish["jobs"]["publish-node"]["steps"]
    action = [s for s in steps if str(s.get("uses", "")).startswith("Comfy-Org/publish-node-action@")]
    assert len(action) == 1
    assert action[0]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert action[0]["if"] == "steps.version.outputs.changed == 'true'"
    checkout = next(s for s in steps if str(s.get("uses", "")).startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0, "the version check reads the commit before the push"


def _git(repo: Path, *args: str) -> str:
    env = dict(
        os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"
    )
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _version_check(publish, repo: Path, before: str) -> str:
    step = next(s for s in publish["jobs"]["publish-node"]["steps"] if s.get("id") == "version")
    assert step["env"]["BEFORE"] == "${{ github.event.before }}"
    out = repo / "github_output"
    out.write_text("")
    env = dict(
        os.environ, BEFORE=before, GITHUB_OUTPUT=str(out), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    subprocess.run(["bash", "-c", step["run"]], cwd=repo, env=env, check=True, capture_output=True, text=True)
    return out.read_text().strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_publish_version_check_fires_only_when_the_version_changes(publish, tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q")
    text = (ROOT / "pyproject.toml").read_text()
    (repo / "pyproject.toml").write_text(text)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "first")
    first = _git(repo, "rev-parse", "HEAD")
    (repo / "pyproject.toml").write_text(text.replace('description = "', 'description = "Edited. ', 1))
    _git(repo, "commit", "-qam", "description only")
    assert _version_check(publish, repo, first) == "changed=false"
    second = _git(repo, "rev-parse", "HEAD")
    version = PYPROJECT["project"]["version"]
    (repo / "pyproject.toml").write_text(text.replace(f'version = "{version}"', 'version = "9.9.9"', 1))
    _git(repo, "commit", "-qam", "bump")
    assert _version_check(publish, repo, second) == "changed=true"
    assert _version_check(publish, repo, first) == "changed=true"  # a push of several commits
    assert _version_check(publish, repo, "") == "changed=true"  # run by hand
    assert _version_check(publish, repo, "0" * 40) == "changed=true"  # a new branch


# ---------------------------------------------------------------------------------------------------------
# Shipped files

EXAMPLES = ROOT / "example_workflows"


def test_example_workflows_ship_with_thumbnails_and_are_not_left_out_of_the_archive():
    files = sorted(EXAMPLES.glob("*.json"))
    assert files, "no example_workflows/*.json"
    for f in files:
        assert f.with_suffix(".jpg").is_file(), f"{f.name} has no thumbnail"
    assert not (ROOT / "workflows").exists(), "workflows/ moved to example_workflows/"
    ignored = [ln.strip() for ln in (ROOT / ".comfyignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert not any(p.strip("/").startswith("example_workflows") for p in ignored), ignored


def test_every_server_node_in_the_example_workflows_names_its_pack():
    """What ComfyUI-Manager resolves a shared workflow's packs by: properties cnr_id / ver on every node."""
    version = PYPROJECT["project"]["version"]
    for f in sorted(EXAMPLES.glob("*.json")):
        for node in json.loads(f.read_text())["nodes"]:
            props = node.get("properties", {})
            where = f"{f.name} node {node['id']} ({node['type']})"
            if node["type"] in ("MarkdownNote", "Note"):  # frontend-only: no Python node, no pack
                assert "cnr_id" not in props, where
            elif node["type"].startswith("ZeroCon"):
                assert props.get("cnr_id") == PYPROJECT["project"]["name"] and props.get("ver") == version, where
            else:
                assert props.get("cnr_id") == "comfy-core" and _SEMVER.match(props.get("ver", "")), where
