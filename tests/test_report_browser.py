"""report.html in a real browser (headless Chromium): the page's scripts run without console errors, every
interactive figure is drawn (plotly's SVG in the DOM), and every figure area of a screenshot shows a picture.

Skipped with a message when no Chromium is installed, except in CI (env CI set), where .ci/run installs Debian's
`chromium` and a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hooklens import cli

pytest.importorskip("plotly", reason="plotly is in the test extra: pip install -e '.[test]'")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Interactive figures per page: induction = loss, induction and previous-token scores, the attention patterns of the
# top induction and previous-token heads' layers, MLP patching, OV copying; patch = residual stream, head outputs;
# circuit = the faithfulness curves.
PLOTLY_FIGURES = {"induction": 7, "patch": 2, "circuit": 1}
# Small runs: the page, not the analysis, is under test here.
QUICK = {"induction": ["--seq-len", "20", "--batch", "2", "--kcomp-rows", "50"], "patch": [],
         "circuit": ["--method", "EAP", "--n-prompts", "6", "--batch", "3", "--seed", "3"]}
WIDTH = 1280

# Injected first into a copy of the page: records console.error / console.warn calls and uncaught errors, and after
# load the page height and each figure's box, into the DOM that --dump-dom prints.
PROBE_HEAD = """<script>
window.__problems = [];
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = function (...args) {
    window.__problems.push(level + ": " + args.join(" "));
    original.apply(console, args);
  };
}
window.addEventListener("error", e => window.__problems.push("uncaught: " + e.message));
window.addEventListener("unhandledrejection", e => window.__problems.push("unhandled rejection: " + e.reason));
</script>"""
PROBE_BODY = """<script>
window.addEventListener("load", () => setTimeout(async () => {
  // every entry of every head selector, applied as a click would (Plotly.update with the entry's args), then the
  // selector's opening entry again: which traces show, and the title, after each
  const selectors = [];
  for (const div of document.querySelectorAll(".plotly-graph-div")) {
    for (const menu of div.layout.updatemenus || []) {
      const shown = [], titles = [];
      for (const button of menu.buttons) {
        await Plotly.update(div, ...button.args);
        shown.push(div.data.flatMap((trace, i) => trace.visible === false ? [] : [i]));
        titles.push(div.layout.title.text);
      }
      await Plotly.update(div, ...menu.buttons[menu.active].args);
      selectors.push({labels: menu.buttons.map(b => b.label), shown, titles});
    }
  }
  const box = el => {
    const r = el.getBoundingClientRect();
    return [r.left, r.top + window.scrollY, r.width, r.height];
  };
  const probe = {
    height: document.documentElement.scrollHeight,
    problems: window.__problems,
    selectors,
    plots: [...document.querySelectorAll(".plotly-graph-div")].map(el => ({
      box: box(el), svgs: el.querySelectorAll(".main-svg").length,
      cells: el.querySelectorAll(".hm image, .heatmaplayer image, .scatterlayer path").length })),
    pngs: [...document.querySelectorAll("img.png")].map(el => ({
      box: box(el), loaded: el.complete && el.naturalWidth > 0 })),
  };
  const out = document.createElement("pre"); out.id = "probe"; out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
}, 500));
</script>"""


def _chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    message = ("no Chromium found (looked for " + ", ".join(BROWSERS) + "); install one to run this test, e.g. "
               "`apt-get install -y --no-install-recommends chromium` (.ci/run does so in CI)")
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("CI must run the browser test: " + message)
    pytest.skip(message)


def _run(browser: str, page: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               "--no-first-run", "--disable-extensions", "--force-device-scale-factor=1",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
               f"--user-data-dir={page.parent / '.chromium-profile'}", *flags, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module", params=sorted(PLOTLY_FIGURES))
def rendered(request, tmp_path_factory):
    """A command's report.html opened in Chromium: (command, probe from the DOM, screenshot [h, w, 3], stderr)."""
    browser = _chromium()
    command = request.param
    out = tmp_path_factory.mktemp(command) / "run"
    assert cli.main([command, "--out", str(out), "--quiet", "--device", "cpu", *QUICK[command]]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    probed = out / "probed.html"  # beside the report: the same relative links
    probed.write_text(page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1),
                      encoding="utf-8")
    dom = _run(browser, probed, "--dump-dom", f"--window-size={WIDTH},900")
    assert dom.returncode == 0, dom.stderr[-3000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, "the page's load handler never ran:\n" + dom.stderr[-3000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                       .replace("&amp;", "&"))
    shot = out / "screenshot.png"
    result = _run(browser, probed, f"--screenshot={shot}", f"--window-size={WIDTH},{probe['height']}")
    assert result.returncode == 0 and shot.exists(), result.stderr[-3000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))  # [height, width, RGB]
    return command, probe, pixels, dom.stderr + result.stderr


def test_no_console_errors(rendered):
    command, probe, _, stderr = rendered
    assert probe["problems"] == [], probe["problems"]
    # what Chromium itself logs from the page (console messages, uncaught exceptions)
    console = [line for line in stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"Uncaught|Error|error", line)], console


def test_every_figure_is_drawn(rendered):
    command, probe, _, _ = rendered
    plots, pngs = probe["plots"], probe["pngs"]
    assert len(plots) == PLOTLY_FIGURES[command]
    # plotly draws a figure as SVG layers; an empty div (script failed) has none
    assert all(plot["svgs"] >= 1 and plot["cells"] >= 1 for plot in plots), plots
    want_pngs = [name for name in cli.OUTPUT_FILES[command] if name.endswith(".png")]
    assert len(pngs) == len(want_pngs) and all(png["loaded"] for png in pngs), pngs


def test_head_selectors_show_one_head_each(rendered):
    """In the browser, each entry of an attention view's selector shows exactly its head and names it."""
    command, probe, _, _ = rendered
    assert len(probe["selectors"]) == (2 if command == "induction" else 0)  # top induction / previous-token layers
    for selector in probe["selectors"]:
        n_heads = len(selector["labels"])
        assert n_heads == 4  # the embedded model's heads per layer
        assert selector["shown"] == [[h] for h in range(n_heads)]
        assert [title.split(": ")[-1] for title in selector["titles"]] == selector["labels"]


def test_screenshot_figure_areas_are_not_blank(rendered):
    """Each figure's box in the screenshot holds a picture: many colours and contrast, not an empty white area (a
    figure whose script failed is one colour, std 0; the sparsest drawn figure, a PNG line plot on white, has ~500
    colours, std ~30 and ~5% non-white pixels)."""
    command, probe, pixels, _ = rendered
    assert pixels.shape[0] >= probe["height"] - 1 and pixels.shape[1] == WIDTH
    for kind in ("plots", "pngs"):
        for number, item in enumerate(probe[kind]):
            left, top, width, height = (int(round(v)) for v in item["box"])
            assert width > 200 and height > 150, (kind, number, item)
            region = pixels[top:top + height, left:left + width].reshape(-1, 3)
            colours = len(np.unique(region, axis=0))
            non_white = float((region != 255).any(-1).mean())
            assert colours > 100 and region.std() > 10 and non_white > 0.02, (kind, number, colours, non_white)
