"""Hostile and broken config and prompts files (faults.md #37).

Each case is a real file on disk read through the real loader or the real CLI: one short line,
fast, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sd35trt.bench.evaluate import load_prompts
from sd35trt.cli import app
from sd35trt.config import load_config
from sd35trt.errors import ConfigError
from sd35trt.stages.calibrate import read_prompts
from sd35trt.user_files import MAX_ERROR_CHARS

REPO = Path(__file__).resolve().parents[2]

#: 9 levels of 9 aliases: 9^9 = 387 million strings once expanded (the attack's 316-byte file).
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_alias_bomb_is_refused_fast_in_one_short_line(tmp_path):
    """faults.md #37: the attack's alias bomb took 11 s and 1.5 GB and printed a 312 MB "line"."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sd35trt.cli",
            "calibrate",
            "--config",
            str(bomb),
            "--run-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "SD35TRT_DEBUG"} | {"PYTHONPATH": str(REPO)},
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr
    out = (proc.stdout + proc.stderr).strip()
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1 and len(out) < MAX_ERROR_CHARS + 200, out[:500]
    assert "alias *a is not allowed" in out and "bomb.yaml" in out
    assert elapsed < 30  # the interpreter's start and the CLI import; the parse itself is instant
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_one_alias_is_refused_too(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nbuild: &b {}\nruntime: *b\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML: alias \*b is not allowed.*line 3"):
        load_config(p)


def test_duplicate_keys_are_refused_naming_key_and_lines(tmp_path):
    """faults.md #37: a second ``export:`` silently turned quantization off."""
    p = tmp_path / "dup.yaml"
    p.write_text("name: x\nexport:\n  quantize: true\nruntime: {}\nexport:\n  quantize: false\n")
    with pytest.raises(
        ConfigError, match=r"dup\.yaml: not valid YAML: key 'export' appears twice \(lines 2 and 5\)"
    ):
        load_config(p)
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: x\nruntime: {width: 64, width: 128}\n")
    with pytest.raises(ConfigError, match=r"key 'width' appears twice \(lines 2 and 2\)"):
        load_config(nested)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"config file .*cfg\.yaml is a directory, not a file"),
        (b"name: caf\xe9\n", r"config file .*cfg\.yaml is not UTF-8 text \(byte offset 9\)"),
        (b"name: x\nseed: " + b"9" * 5000 + b"\n", r"cfg\.yaml: a value cannot be read: Exceeds the limit"),
        (b"name: x\x00\x01\x02", r"config file .*cfg\.yaml is binary \(a NUL byte at offset 7\)"),
    ],
    ids=["directory", "latin-1", "5000-digit-int", "binary"],
)
def test_unreadable_configs_are_one_line(tmp_path, content, expected):
    """faults.md #37: each was a traceback (IsADirectoryError, UnicodeDecodeError, ValueError)."""
    p = tmp_path / "cfg.yaml"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(p)
    assert "\n" not in str(err.value) and len(str(err.value)) < MAX_ERROR_CHARS + 200
    # the CLI raises it as a user error (main() prints those as one line, exit 1)
    result = CliRunner().invoke(app, ["export", "--config", str(p), "--run-dir", str(tmp_path / "r")])
    assert isinstance(result.exception, ConfigError), result.exception


@pytest.mark.parametrize("kind", ["binary", "directory", "latin-1"])
def test_prompt_files_that_are_not_text_are_one_line(tmp_path, kind):
    """faults.md #37: a binary or directory prompts file was a traceback in calibrate and eval."""
    p = tmp_path / "prompts.txt"
    if kind == "directory":
        p.mkdir()
    else:
        p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" if kind == "binary" else b"une caf\xe9\n")
    reason = {"binary": "is binary", "directory": "is a directory", "latin-1": "is not UTF-8 text"}[kind]
    with pytest.raises(ConfigError, match=rf"calibrate\.prompts: prompt file .*prompts\.txt {reason}"):
        read_prompts(p, 1, "prompts")
    with pytest.raises(ConfigError, match=rf"prompts file .*prompts\.txt {reason}"):
        load_prompts(p)


def test_a_huge_value_is_quoted_short(tmp_path):
    """faults.md #37: error text is capped whatever the file holds."""
    p = tmp_path / "big.yaml"
    p.write_text("name: x\nruntime:\n  num_inference_steps: " + "z" * 100_000 + "\n")
    cut = r"invalid config: field runtime\.num_inference_steps: .*\(found 'zzz.*\.\.\.\)"
    with pytest.raises(ConfigError, match=cut) as err:
        load_config(p)
    assert len(str(err.value)) < MAX_ERROR_CHARS + 200
