"""The nightly trend page as a browser shows it: headless Chromium renders it offline, charts and all.

The page itself has no script (it must open anywhere, from a CI artifact); the checks that need one run in a copy
with a probe script appended, which measures every chart in the rendered layout and writes what it found into the
DOM that ``--dump-dom`` prints. A screenshot of the page itself must show the charts' colours. Skipped where no
Chromium is installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.cli import nightly
from harness.storing import history
from tests.harness.fixtures_results import make_night

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless browser: apt-get install -y chromium")

SUITE = """\
version: 1
name: synthetic
scenarios: [scenario.yaml]
reference_nights: 7
min_nights: 3
gate: {tokens_per_s: 0.05, peak_vram_nvml_gib: 0.05}
"""
# appended to a copy of the page: the rendered size of every chart and of its marks, written into the DOM
PROBE = """<script>
addEventListener("load", () => {
  const box = e => { const b = e.getBoundingClientRect(); return [Math.round(b.width), Math.round(b.height)]; };
  const charts = [...document.querySelectorAll("svg")].map(s => ({
    size: box(s),
    points: [...s.querySelectorAll("circle")].map(c => box(c)),
    red: [...s.querySelectorAll("circle")].filter(c => getComputedStyle(c).fill === "rgb(214, 39, 40)").length,
    band: [...s.querySelectorAll("polygon")].map(p => box(p)),
    lines: [...s.querySelectorAll("polyline")].map(p => p.points.numberOfItems),
  }));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({charts, rows: document.querySelectorAll("tr.bad").length,
                                    width: document.body.scrollWidth});
  document.body.appendChild(out);
});
</script>"""




def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={cwd / 'profile'}", "--window-size=1000,2400", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """trend.html of six synthetic nights, the sixth a 30 % drop of hf's tokens/s (a regression); nights 4 to 6
    have three nights before them, so the band spans three nights."""
    tmp = tmp_path_factory.mktemp("trend")
    results, db = tmp / "results", tmp / "h.duckdb"
    tps = (1000.0, 1010.0, 990.0, 1005.0, 995.0, 700.0)
    nights = [make_night(results, day, v, git_sha=f"{day:x}" * 40) for day, v in enumerate(tps, start=1)]
    for d in nights[:-1]:
        history.append(db, d)
    (tmp / "scenario.yaml").write_text("name: unused\n")
    (tmp / "suite.yaml").write_text(SUITE)
    code = nightly.main([str(tmp / "suite.yaml"), "--results", str(results), "--reports", str(tmp / "reports"),
                         "--db", str(db), "--tonight", str(nights[-1]), "--quiet"])
    assert code == 1
    return tmp / "reports" / "nightly-synthetic" / "trend.html"


def test_every_chart_renders_with_its_marks(page: Path):
    probe = page.with_name("probe.html")
    text = page.read_text()
    assert "<script" not in text  # the page itself stays script-free; only the copy is probed
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    r = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), cwd=page.parent)
    m = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the probe never ran: {r.stderr[-2000:]}"
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    charts = found["charts"]
    assert len(charts) == 4  # two gated metrics x two frameworks
    for c in charts:
        assert c["size"] == [640, 200]
        assert len(c["points"]) == 6 and all(w > 0 and h > 0 for w, h in c["points"])  # one mark per night
        assert c["band"] and all(w > 100 and h > 0 for w, h in c["band"])  # the noise band over nights 4 to 6
        assert max(c["lines"]) == 6  # the nights' line passes through every night
    assert sum(c["red"] for c in charts) == 1  # tonight's hf tokens/s, and only it, drawn as a regression
    assert found["rows"] == 1 and found["width"] <= 1000  # one table row marked; nothing wider than the window


def test_screenshot_shows_the_charts(page: Path):
    from PIL import Image  # Pillow comes with matplotlib; only this test decodes an image

    shot = page.with_name("shot.png")
    r = _chromium(f"--screenshot={shot}", page.as_uri(), cwd=page.parent)
    assert shot.exists() and shot.stat().st_size > 0, r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 2400)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert len(colours) > 20  # not a blank page
    assert (214, 39, 40) in colours  # the regression's red mark
    # the band: #9ecae1 at 40 % opacity over white
    assert any(abs(r - 216) <= 3 and abs(g - 234) <= 3 and abs(b - 243) <= 3 for r, g, b in colours)
