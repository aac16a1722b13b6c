"""The HTML report of a real run, rendered by a real headless Chromium."""
import shutil
import subprocess

import pytest

from tests.e2e.helpers import run_cli

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _chromium(*args, timeout=90) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is not installed (scripts/setup_env.sh installs it with apt-get)"
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def test_report_renders_one_loaded_thumbnail_per_sampled_row(personalized_run, tmp_path):
    work, _, _ = personalized_run
    html = tmp_path / "report.html"
    proc = run_cli(["report", str(work / "out"), "--out", str(html), "--sample", "12"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = int(proc.stdout.split("12 sampled rows, ")[1].split(" images shown")[0])
    text = html.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text   # self-contained: nothing to fetch
    # a sample of each family, with its images (a row of a concept with references: them first)
    for family in ("· open", "· recognition", "· multi", "· text"):
        assert family in text, family
    dom = _chromium("--dump-dom", html.as_uri()).stdout
    assert 'data-ready="1"' in dom                             # the page's load handler ran
    # 12 cards, some with reference images too; error rows (sampled too) show a placeholder
    assert dom.count('data-shown="1"') == shown > 12
    assert dom.count('class="thumb"') == dom.count('data-loaded="1"') >= shown   # every thumbnail decoded
    for section in ("Rows per status", "Answer length", "Questions per template", "QA rows committed over time"):
        assert section in dom
    assert "rows_in" in dom and "recognition_labels" in dom
    shot = tmp_path / "report.png"
    _chromium("--hide-scrollbars", "--window-size=1280,1500", f"--screenshot={shot}", html.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_of_a_missing_output_is_a_clear_error(tmp_path):
    proc = run_cli(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "no output rows" in proc.stderr
