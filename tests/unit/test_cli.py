import json
import subprocess
import sys
from pathlib import Path

import pytest
from record_fakes import export_details
from typer.testing import CliRunner

from sd35trt.artifacts.manifest import RunManifest, Stage, new_record
from sd35trt.cli import app


def test_cli_import_leaves_heavy_modules_out():
    code = (
        "import sys, sd35trt.cli, sd35trt.config, sd35trt.artifacts.manifest, sd35trt.components;"
        "print(sorted(m for m in ('tensorrt', 'modelopt', 'torch', 'onnx', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_the_verbs():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("info", "inspect", "tiny", "reference"):
        assert verb in result.stdout


def test_user_error_is_one_line_exit_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "inspect", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error:") and "nowhere has no manifest.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_typo_via_cli_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nruntime:\n  stepz: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "reference", "a cat", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "runtime.stepz" in proc.stderr and "bad.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_env_shows_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sd35trt.cli", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "SD35TRT_DEBUG": "1"},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_tiny_and_info_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["tiny", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "model_index.json").is_file()
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "torch" in result.stdout and "tensorrt" in result.stdout


def test_calibrate_is_skipped_when_nothing_is_quantized(tmp_path):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / "configs" / "tiny-fp32.yaml"
    result = CliRunner().invoke(app, ["calibrate", "--config", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    assert not (tmp_path / "r" / "calibrate").exists()


class _Output:
    def warning_lines(self) -> list[str]:
        return []

    def report(self, timings: bool = False) -> str:
        return "ok"


@pytest.mark.parametrize(
    ("argv", "steps", "guidance"),
    [
        (["--num-inference-steps", "6", "--guidance-scale", "2.5"], 6, 2.5),
        (["--steps", "5", "--guidance", "1.5"], 5, 1.5),
        ([], None, None),
    ],
)
def test_run_options_are_diffusers_names_with_short_aliases(monkeypatch, tmp_path, argv, steps, guidance):
    import sd35trt.run
    import sd35trt.stages.package

    seen = {}
    monkeypatch.setattr(sd35trt.stages.package, "engines_dir_of", lambda path: path)
    monkeypatch.setattr(sd35trt.run, "run", lambda *args, **kwargs: seen.update(kwargs) or _Output())
    result = CliRunner().invoke(app, ["run", "a cat", "--engines", str(tmp_path), *argv])
    assert result.exit_code == 0, result.output
    assert (seen["num_inference_steps"], seen["guidance_scale"]) == (steps, guidance)


@pytest.mark.parametrize(("argv", "threshold"), [(["--cache-threshold", "0.12"], 0.12), ([], None)])
def test_run_passes_the_cache_threshold(monkeypatch, tmp_path, argv, threshold):
    import sd35trt.run
    import sd35trt.stages.package

    seen = {}
    monkeypatch.setattr(sd35trt.stages.package, "engines_dir_of", lambda path: path)
    monkeypatch.setattr(sd35trt.run, "run", lambda *args, **kwargs: seen.update(kwargs) or _Output())
    result = CliRunner().invoke(app, ["run", "a cat", "--engines", str(tmp_path), *argv])
    assert result.exit_code == 0, result.output
    assert seen.get("cache_threshold") == threshold


def test_malformed_run_manifest_is_one_line_naming_file_and_field(tmp_path):
    """A record whose JSON has the wrong type: one line naming the file and the field, exit 1."""
    RunManifest(tmp_path).put(Stage.EXPORT, new_record(Stage.EXPORT, "e", [], details=export_details()))
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    data["records"]["export"]["details"]["components"]["transformer"]["onnx"] = 5
    path.write_text(json.dumps(data))
    field = "records.export.details.components.transformer.onnx"
    repo = Path(__file__).resolve().parents[2]
    for args in (
        ["inspect", str(tmp_path)],
        ["build", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "sd35trt.cli", *args], capture_output=True, text=True, cwd=repo
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{path}: field {field}: Input should be a valid string (found 5)" in proc.stderr


def test_run_with_an_unreadable_image_is_one_line_before_any_engine(tmp_path):
    bad = tmp_path / "in.png"
    bad.write_bytes(b"not a png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd35trt.cli",
            "run",
            "a cat",
            "--engines",
            str(tmp_path / "nowhere"),
            "--image",
            str(bad),
            "--strength",
            "0.5",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip() == f"error: image {bad} is not a PNG, JPEG or WebP image (the formats accepted)"
    )


def test_model_by_repo_id_missing_from_the_cache_is_one_line(tmp_path):
    cfg = tmp_path / "hub.yaml"
    cfg.write_text("name: hub\nmodel:\n  source: hub\n  path: stabilityai/stable-diffusion-3.5-large\n")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("SD35TRT_ALLOW_DOWNLOAD", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd35trt.cli",
            "calibrate",
            "--config",
            str(cfg),
            "--run-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: model.path: stabilityai/stable-diffusion-3.5-large (revision main) is not in"
    )
    assert "`hf download stabilityai/stable-diffusion-3.5-large --include 'model_index.json'" in line


def test_version_and_verbose_after_the_verb():
    from importlib import metadata

    from sd35trt.cli import hoist_verbose

    proc = subprocess.run([sys.executable, "-m", "sd35trt.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"sd35trt {metadata.version('sd35trt')}"
    assert hoist_verbose(["run", "-e", "E", "a cat", "-v"]) == ["-v", "run", "-e", "E", "a cat"]
    assert hoist_verbose(["info", "--verbose", "--", "-v"]) == ["--verbose", "info", "--", "-v"]
    proc = subprocess.run([sys.executable, "-m", "sd35trt.cli", "info", "-v"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "No such option" not in proc.stderr


def test_triton_repository_is_the_default_command_and_serve_checks_its_repository(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(app, ["triton", "--help"]).stdout
    assert "repository" in help_text and "serve" in help_text
    # `sd35trt triton ENGINES --out REPO` still means `triton repository ...`
    r = runner.invoke(app, ["triton", str(tmp_path / "no-engines"), "--out", str(tmp_path / "repo")])
    assert r.exit_code != 0 and "no-engines" in str(r.exception)
    r = runner.invoke(app, ["triton", "serve", str(tmp_path / "missing")])
    assert "is not a directory; write one with `sd35trt triton ENGINES --out" in str(r.exception)


def test_triton_serve_refuses_an_empty_folder_and_an_engines_directory_before_starting(tmp_path):
    """tritonserver reported an empty folder ready (serving nothing) and an engines directory as a
    page of its own log; both are one line now, before any server starts."""
    import json

    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["triton", "serve", str(empty)])
    assert "holds no model (no */config.pbtxt)" in str(r.exception)
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "manifest.json").write_text(json.dumps({"engines": {}}))  # an engine manifest's shape
    r = runner.invoke(app, ["triton", "serve", str(engines)])
    said = str(r.exception)
    assert "is an engines directory, not a Triton model repository" in said
    assert f"write one from it with `sd35trt triton {engines} --out REPO`" in said


def test_tiny_out_never_replaces_a_users_files(tmp_path):
    """faults.md #47: ``tiny --out`` naming a folder with files, or a file, is refused; they survive."""
    runner = CliRunner()
    folder, file = tmp_path / "mine", tmp_path / "notes.txt"
    folder.mkdir()
    (folder / "data.txt").write_text("keep")
    file.write_text("keep")
    r = runner.invoke(app, ["tiny", "--out", str(folder)])
    assert r.exit_code != 0 and "holding files; give a new or empty directory" in str(r.exception)
    r = runner.invoke(app, ["tiny", "--out", str(file)])
    assert r.exit_code != 0 and "is a file; a directory is needed" in str(r.exception)
    assert (folder / "data.txt").read_text() == file.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]  # nothing staged beside


@pytest.mark.parametrize(
    ("name", "alias", "value"),
    [("--num-inference-steps", "--steps", "3"), ("--guidance-scale", "--guidance", "2")],
)
def test_a_parameter_and_its_alias_together_are_refused(tmp_path, name, alias, value):
    """faults.md #48: as HTTP and Triton refuse them (the last one silently won before)."""
    r = CliRunner().invoke(app, ["run", "--engines", str(tmp_path), "x", alias, value, name, value])
    assert r.exit_code != 0
    assert f"{name} and {alias} are the same parameter; give one of them" in str(r.exception)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--engines", "E", "--out", "FILE"],
        ["eval", "--engines", "E", "--out", "FILE"],
        ["bench", "--engines", "E", "--device", "foo"],
    ],
)
def test_bench_and_eval_refuse_an_out_file_and_an_unknown_device_in_one_line(tmp_path, argv):
    """faults.md #47: before any engine is opened (were tracebacks)."""
    (tmp_path / "FILE").write_text("keep")
    argv = [str(tmp_path / a) if a in ("E", "FILE") else a for a in argv]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code != 0
    assert "is a file; a directory is needed" in str(r.exception) or "give cpu, cuda or cuda:N" in str(
        r.exception
    )
    assert (tmp_path / "FILE").read_text() == "keep"


def test_an_output_directory_inside_the_engines_is_refused(tmp_path):
    from sd35trt.errors import ConfigError
    from sd35trt.user_files import output_directory

    with pytest.raises(ConfigError, match=r"--out .*repo is inside .*engines; give a directory outside it"):
        output_directory(tmp_path / "engines" / "repo", "--out", outside=tmp_path / "engines")
    output_directory(tmp_path / "repo", "--out", outside=tmp_path / "engines")


def test_a_stage_without_its_upstream_record_writes_nothing(tmp_path):
    """faults.md #49: ``build`` on an empty run directory names the command to run first (options
    inside its backticks) and leaves the folder as it was (it used to write the built-in model)."""
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd35trt.cli",
            "build",
            "-c",
            str(repo / "configs/tiny.yaml"),
            "--run-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no export record: run "
        f"`sd35trt export --config {repo / 'configs/tiny.yaml'} --run-dir {tmp_path}` first"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "num_inference_steps 0 is outside 1..500"),
        (["--height", "100"], "--height 100 is not a multiple of 16"),
        (["-o", "picture"], "a .png file name is needed"),
    ],
)
def test_reference_checks_its_parameters_as_run_does(tmp_path, argv, message):
    """faults.md #47: before the pipeline loads (were an image with 0 steps and diffusers/PIL tracebacks)."""
    r = CliRunner().invoke(app, ["reference", "a cat", "--run-dir", str(tmp_path / "r"), *argv])
    assert r.exit_code != 0 and message in str(r.exception)
    assert not (tmp_path / "r").exists()


def test_help_says_where_defaults_come_from():
    runner = CliRunner()
    reference = " ".join(runner.invoke(app, ["reference", "--help"]).stdout.split())
    assert "the config's runtime section" in reference and "engines' recorded" not in reference
    bench = " ".join(runner.invoke(app, ["bench", "--help"]).stdout.split())
    assert "drawn below" not in bench  # its seed defaults to 0, as typer shows


def test_run_refuses_num_images_below_one_naming_the_bound_that_applies(tmp_path):
    """faults.md #47: was "outside 1..1", a bound made from the refused count itself."""
    r = CliRunner().invoke(app, ["run", "--engines", str(tmp_path), "x", "--num-images", "0"])
    assert r.exit_code != 0 and str(r.exception) == "num_images 0 is not 1 or more"


@pytest.mark.parametrize("verb", ["bench", "eval"])
def test_bench_and_eval_of_an_unpacked_artefact_need_an_out_outside_it(tmp_path, verb):
    """faults.md #47: the default ``<engines>/../bench`` was inside the artefact (its verify then failed)."""
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "manifest.json").write_text("{}")
    (tmp_path / "SHA256SUMS").write_text("")
    r = CliRunner().invoke(app, [verb, "--engines", str(tmp_path)])
    assert r.exit_code != 0 and f"--out is needed: the default, {tmp_path / verb}, is inside" in str(
        r.exception
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SHA256SUMS", "engines"]


def test_verify_compare_of_an_archive_says_it_ships_no_onnx_before_verifying(tmp_path):
    """faults.md #47: it printed "OK", then a missing-manifest error advising `sd35trt build`."""
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(b"not read")
    r = CliRunner().invoke(app, ["verify", str(archive), "--compare"])
    assert r.exit_code != 0 and "is an artefact, which ships no ONNX" in str(r.exception)
    assert "OK" not in r.output
