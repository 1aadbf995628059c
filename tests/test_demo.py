"""The web demo: input checks and mask conversion (no browser), stage reporting equal to `generate`, and the page
driven in a real headless Chromium (Playwright) against the sample CLI's images."""
from __future__ import annotations

import io
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from unclip_jax import demo as D

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("UNCLIP_CHROMIUM", "/usr/bin/chromium")
PROMPT = "a red circle on a white background"


# ---- input checks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   ", None, "\n\t"])
def test_empty_prompt_is_refused(text):
  with pytest.raises(D.DemoInputError, match="prompt is empty"):
    D.check_prompt(text)


def test_prompt_is_stripped_and_bounded():
  assert D.check_prompt("  a red circle ") == "a red circle"
  with pytest.raises(D.DemoInputError, match="characters long"):
    D.check_prompt("x" * (D.MAX_PROMPT_CHARS + 1))


@pytest.mark.parametrize("value, spec", [("25", "25"), (25, "25"), (25.0, "25"), (" DDIM50 ", "ddim50"), ("1", "1"),
                                         ("1000", "1000")])
def test_steps_accepted(value, spec):
  assert D.check_steps(value, "Decoder steps") == spec


@pytest.mark.parametrize("value, message", [("0", "between 1 and 1000"), ("100000", "between 1 and 1000"),
                                            ("-5", "step count"), ("abc", "step count"), ("", "step count"),
                                            (None, "step count"), ("2.5", "step count")])
def test_absurd_steps_refused(value, message):
  with pytest.raises(D.DemoInputError, match=message) as e:
    D.check_steps(value, "Decoder steps")
  assert "Decoder steps" in str(e.value)


def test_int_and_float_checks():
  assert D.check_int(4.0, "n", 1, 8) == 4
  for bad in (0, 9, 2.5, float("nan"), "x", None):
    with pytest.raises(D.DemoInputError, match="n must"):
      D.check_int(bad, "n", 1, 8)
  assert D.check_float("3.5", "Guidance", 0, 50) == 3.5
  for bad in (-1, 51, float("inf"), "x"):
    with pytest.raises(D.DemoInputError, match="Guidance must"):
      D.check_float(bad, "Guidance", 0, 50)


def test_read_image_from_file_array_and_rgba(tmp_path):
  img = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  Image.fromarray(img).save(tmp_path / "a.png")
  np.testing.assert_array_equal(D.read_image(str(tmp_path / "a.png"), "an image"), img)
  rgba = np.concatenate([img, np.zeros((12, 10, 1), np.uint8)], -1)           # fully transparent -> white
  assert (D.read_image(rgba, "an image") == 255).all()
  with pytest.raises(D.DemoInputError, match="Upload an image"):
    D.read_image(None, "an image")


@pytest.mark.parametrize("content", [b"not an image at all", b""])
def test_non_image_upload_is_refused(tmp_path, content):
  path = tmp_path / "notes.png"
  path.write_bytes(content)
  with pytest.raises(D.DemoInputError, match="not an image"):
    D.read_image(str(path), "an image")


# ---- the inpainting mask ---------------------------------------------------------------------------------------------
def _editor(h=16, w=16, painted=None):
  bg = np.full((h, w, 4), 200, np.uint8)
  bg[..., 3] = 255
  layer = np.zeros((h, w, 4), np.uint8)
  if painted is not None:
    layer[painted] = (255, 0, 255, 255)
  return {"background": bg, "layers": [layer], "composite": bg}


def test_painted_pixels_become_the_unknown_region():
  image, known = D.editor_mask(_editor(painted=(slice(4, 8), slice(2, 12))))
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8 and (image == 200).all()
  assert known.shape == (16, 16) and known.dtype == bool
  assert not known[4:8, 2:12].any() and known.sum() == 256 - 40


def test_soft_brush_edges_count_as_painted():
  e = _editor()
  e["layers"][0][3, 3] = (255, 0, 255, 1)
  _, known = D.editor_mask(e)
  assert not known[3, 3] and known.sum() == 255


def test_nothing_painted_is_refused():
  with pytest.raises(D.DemoInputError, match="Nothing to fill"):
    D.editor_mask(_editor())
  with pytest.raises(D.DemoInputError, match="Upload an image to inpaint"):
    D.editor_mask(None)
  with pytest.raises(D.DemoInputError, match="Upload an image to inpaint"):
    D.editor_mask({"background": None, "layers": []})


def test_layer_of_another_size_is_refused():
  e = _editor()
  e["layers"] = [np.full((8, 8, 4), 255, np.uint8)]
  with pytest.raises(D.DemoInputError, match="painted mask is 8x8 but the image is 16x16"):
    D.editor_mask(e)


def test_uploaded_mask_replaces_the_painting(tmp_path):
  m = np.full((16, 16), 255, np.uint8)
  m[:, :5] = 0                                                              # black = fill
  Image.fromarray(m).save(tmp_path / "mask.png")
  _, known = D.editor_mask(_editor(painted=(slice(0, 16), slice(0, 16))), str(tmp_path / "mask.png"))
  assert not known[:, :5].any() and known[:, 5:].all()


def test_uploaded_mask_of_wrong_size_is_refused(tmp_path):
  Image.fromarray(np.zeros((8, 12), np.uint8)).save(tmp_path / "mask.png")
  with pytest.raises(D.DemoInputError, match="mask is 12x8 but the image is 16x16"):
    D.editor_mask(_editor(), str(tmp_path / "mask.png"))
  (tmp_path / "bad.png").write_bytes(b"junk")
  with pytest.raises(D.DemoInputError, match="not an image"):
    D.editor_mask(_editor(), str(tmp_path / "bad.png"))


# ---- small helpers ---------------------------------------------------------------------------------------------------
def test_stage_overrides_keep_only_changes():
  settings = {"prior": {"steps": "25", "guidance_scale": 2.0}, "decoder": {"steps": "25", "guidance_scale": 3.0}}
  assert D.stage_overrides(settings, {"prior": {"steps": "25", "guidance_scale": 2.0}}) == {}
  assert D.stage_overrides(settings, {"prior": {"steps": "10", "guidance_scale": 2.0},
                                      "decoder": {"steps": "25", "guidance_scale": 5}}) == {
      "prior": {"steps": "10"}, "decoder": {"guidance_scale": 5}}
  assert D.stage_overrides(settings, {"super_res": {"steps": "7"}}) == {}  # a stage the bundle lacks


def test_strip_and_gif(tmp_path):
  frames = np.stack([np.full((8, 8, 3), 40 * k, np.uint8) for k in range(4)])
  assert D.strip(frames).shape == (8, 32, 3)
  path = D.write_gif(frames, tmp_path / "a.gif")
  with Image.open(path) as im:
    assert im.is_animated and im.n_frames == 6                             # forward, then back (ping-pong)
    assert im.size == (256, 256)


# ---- the embedded model: stage reporting, no change to the images ----------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
  from unclip_jax.inference.pipeline import UnCLIP
  from unclip_jax.sample import DEFAULT_BUNDLE

  return UnCLIP.from_bundle(DEFAULT_BUNDLE, dtype="float32")


def test_demo_reports_stages_and_equals_generate(pipe, tmp_path):
  demo = D.Demo(pipe, tmp_dir=tmp_path)
  seen = []
  with D.reporting(seen.append):
    images, scores = demo.text_to_images(PROMPT, 2, 5)
  assert seen == ["prior", "decoder", "super-res"]
  expected = pipe.generate([PROMPT], seed=5, images_per_prompt=2, batch_size=8)
  np.testing.assert_array_equal(images, expected.images)
  assert scores == [None, None]
  assert images.shape == (2, pipe.image_size, pipe.image_size, 3)
  # the form's defaults are the pipeline itself (its compiled programs), a change is a cached variant
  assert demo.pipeline_for(**demo.default_form()) is demo.pipe
  other = dict(demo.default_form(), decoder_steps="10")
  assert demo.pipeline_for(**other).decoder_cfg.sampling.steps == "10"
  with pytest.raises(D.DemoInputError, match="Decoder steps must be between 1 and 1000"):
    demo.pipeline_for(**dict(other, decoder_steps="5000"))
  with pytest.raises(D.DemoInputError, match="prompt is empty"):
    demo.text_to_images(" ", 1, 0)
  with pytest.raises(D.DemoInputError, match="Number of frames must be between 2"):
    demo.interpolate(images[0], images[1], 1)


def test_changed_settings_equal_the_cli_flags(pipe, tmp_path):
  """The form's per-stage values = the sample CLI's --prior-steps/--decoder-guidance/--sr-steps (its sampling dict)."""
  from unclip_jax.inference.pipeline import UnCLIP
  from unclip_jax.sample import DEFAULT_BUNDLE, parse_args, sampling_overrides

  demo = D.Demo(pipe, tmp_dir=tmp_path)
  images, _ = demo.text_to_images(PROMPT, 1, 2, 1, "10", 2.0, "12", 5.0, "3")
  args = parse_args(["--prompt", PROMPT, "--seed", "2", "--out", str(tmp_path), "--prior-steps", "10",
                     "--prior-guidance", "2.0", "--decoder-steps", "12", "--decoder-guidance", "5.0",
                     "--sr-steps", "3"])
  cli = UnCLIP.from_bundle(DEFAULT_BUNDLE, sampling=sampling_overrides(args), dtype="float32")
  np.testing.assert_array_equal(images, cli.generate([PROMPT], seed=2, batch_size=args.batch_size).images)


def test_candidates_rerank_as_generate(pipe, tmp_path):
  images, scores = D.Demo(pipe, tmp_dir=tmp_path).text_to_images(PROMPT, 2, 7, 2)
  expected = pipe.generate([PROMPT], seed=7, images_per_prompt=2, batch_size=8, candidates=2)
  np.testing.assert_array_equal(images, expected.images)
  assert scores == expected.clip_scores and all(s is not None for s in scores)


def test_command_line_defaults():
  args = D.parser().parse_args([])
  assert (args.host, args.port, args.bundle) == ("127.0.0.1", 7860, None)


def test_build_app_without_a_browser(pipe, tmp_path):
  pytest.importorskip("gradio")
  app = D.build_app(pipe, demo=D.Demo(pipe, tmp_dir=tmp_path))
  config = app.get_config_file()
  ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
  assert {"t2i_prompt", "t2i_go", "t2i_gallery", "var_image", "int_gif", "diff_go", "inp_editor"} <= ids
  assert app._queue.default_concurrency_limit == 1


# ---- the page in a real browser --------------------------------------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: pathlib.Path, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the demo server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
    try:
      with urllib.request.urlopen(url, timeout=5) as r:
        if r.status == 200:
          return
    except OSError:
      pass
    time.sleep(1.0)
  raise AssertionError(f"the demo server did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _browser_or_skip():
  pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
  sync_api = pytest.importorskip("playwright.sync_api",
                                 reason="playwright is not installed: pip install -e '.[demo-test]'")
  if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set UNCLIP_CHROMIUM)")
  return sync_api


def _gallery_images(page, elem_id: str) -> list[np.ndarray]:
  srcs = page.eval_on_selector_all(f"#{elem_id} .gallery-item img", "els => els.map(e => e.src)")
  out = []
  for src in srcs:
    assert src.startswith("http://127.0.0.1:"), src                        # served by the demo, not inlined
    out.append(np.asarray(Image.open(io.BytesIO(page.request.get(src, timeout=30_000).body())).convert("RGB")))
  return out


@pytest.mark.slow
def test_demo_in_a_headless_browser(tmp_path):
  """Starts the server (loopback only), types a prompt, clicks, and checks the images equal the CLI's; two pages
  click at once; uploads an image for variations; interpolates; paints a mask and inpaints; checks bad input is
  shown in the page and the server keeps running. Screenshot: $UNCLIP_DEMO_SCREENSHOT (else tmp)."""
  sync_api = _browser_or_skip()
  seed, n = 3, 4
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False")
  cli = subprocess.run([sys.executable, "-m", "unclip_jax.sample", "--prompt", PROMPT, "--seed", str(seed),
                        "--images-per-prompt", str(n), "--out", str(tmp_path / "cli"), "--no-progress", "--no-grid"],
                       env=env, capture_output=True, text=True, timeout=600)
  assert cli.returncode == 0, cli.stderr
  expected = [np.asarray(Image.open(tmp_path / "cli" / f"{k:04d}.png").convert("RGB")) for k in range(n)]

  port = _free_port()
  url = f"http://127.0.0.1:{port}/"
  log = tmp_path / "server.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "unclip_jax.demo", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
  try:
    start = time.monotonic()
    _wait_for_server(url, proc, log, timeout=600)
    startup = time.monotonic() - start
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
      try:
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.set_default_timeout(60_000)
        page.goto(url, timeout=60_000)
        page.wait_for_selector("#t2i_go")

        # text -> images: the CLI's images for the same prompt, seed and (default) settings
        page.get_by_text("Sampler settings per stage").click()              # shown in the screenshot
        page.wait_for_selector("#decoder_steps textarea")
        page.fill("#t2i_prompt textarea", PROMPT)
        page.fill("#t2i_seed input", str(seed))
        clicked = time.monotonic()
        page.click("#t2i_go")
        page.wait_for_function(f"document.querySelectorAll('#t2i_gallery .gallery-item img').length >= {n}",
                               timeout=120_000)
        page.wait_for_selector("#t2i_status :text('seed 3')", timeout=30_000)
        first_click = time.monotonic() - clicked
        got = _gallery_images(page, "t2i_gallery")
        assert len(got) == n
        for k, (a, b) in enumerate(zip(got, expected)):
          assert a.shape == b.shape == (64, 64, 3), (k, a.shape)
          np.testing.assert_array_equal(a, b, err_msg=f"image {k} differs from the CLI's")
        shot = tmp_path / "demo.png"
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(500)
        page.screenshot(path=str(shot))
        if os.environ.get("UNCLIP_DEMO_SCREENSHOT"):
          shutil.copyfile(shot, os.environ["UNCLIP_DEMO_SCREENSHOT"])

        # two users click at once: both queued and served, one after the other
        other = browser.new_page(viewport={"width": 1280, "height": 760})
        other.goto(url, timeout=60_000)
        other.wait_for_selector("#t2i_go")
        for pg, s in ((page, 4), (other, 5)):
          pg.fill("#t2i_seed input", str(s))
        page.click("#t2i_go")
        other.click("#t2i_go")
        for pg, s in ((page, 4), (other, 5)):
          pg.wait_for_selector(f"#t2i_status :text('seed {s}')", timeout=120_000)
        other.close()

        # bad input: an empty prompt is shown in the page, and the server keeps serving
        page.fill("#t2i_prompt textarea", "   ")
        page.click("#t2i_go")
        page.get_by_text("The prompt is empty").first.wait_for(timeout=30_000)
        page.fill("#t2i_prompt textarea", PROMPT)
        page.fill("#decoder_steps textarea", "100000")
        page.click("#t2i_go")
        page.get_by_text("Decoder steps must be between 1 and 1000, got 100000").first.wait_for(timeout=30_000)

        # variations of an uploaded image
        page.get_by_role("tab", name="Variations").click()
        page.set_input_files("#var_image input[type=file]", str(tmp_path / "cli" / "0001.png"))
        page.wait_for_selector("#var_image img", timeout=30_000)
        page.click("#var_go")
        page.wait_for_function("document.querySelectorAll('#var_gallery .gallery-item img').length >= 4",
                               timeout=120_000)
        assert all(v.shape == (64, 64, 3) for v in _gallery_images(page, "var_gallery"))

        # a non-image upload: refused by the page (a text file) or by the server (a corrupt .png)
        page.set_input_files("#var_image input[type=file]", str(text_file))
        page.get_by_text("Invalid file type").first.wait_for(timeout=30_000)
        page.set_input_files("#var_image input[type=file]", str(bad))
        page.click("#var_go")
        page.get_by_text("is not an image this demo can read").first.wait_for(timeout=30_000)

        # interpolation of the two pre-filled images: a strip of n frames and an animated GIF
        page.get_by_role("tab", name="Interpolation").click()
        page.click("#int_go")
        page.wait_for_selector("#int_gif img", timeout=120_000)
        gif = page.request.get(page.get_attribute("#int_gif img", "src"), timeout=30_000).body()
        with Image.open(io.BytesIO(gif)) as im:
          assert im.format == "GIF" and im.n_frames == 2 * 5 - 2
        strip = page.request.get(page.get_attribute("#int_strip img", "src"), timeout=30_000).body()
        assert Image.open(io.BytesIO(strip)).size == (5 * 64, 64)

        # inpainting: a stroke painted on the pre-filled image, then a mask of the wrong size
        page.get_by_role("tab", name="Inpainting").click()
        page.wait_for_selector("#inp_editor canvas", timeout=30_000)
        for attempt in range(3):                  # a stroke made while the canvas is still loading can be lost
          page.wait_for_timeout(1500)
          box = page.locator("#inp_editor canvas").first.bounding_box()
          cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
          page.mouse.move(cx - 40, cy)
          page.mouse.down()
          page.mouse.move(cx + 40, cy + 4, steps=25)
          page.mouse.up()
          refusals = "document.body.innerText.split('Nothing to fill').length"
          before = page.evaluate(refusals)
          page.click("#inp_go")
          page.wait_for_function(f"document.querySelectorAll('#inp_gallery .gallery-item img').length >= 1 || "
                                 f"{refusals} > {before}", timeout=120_000)
          if page.locator("#inp_gallery .gallery-item img").count():
            break
          print(f"inpainting: stroke {attempt} was not registered by the canvas, painting again")
        assert _gallery_images(page, "inp_gallery")[0].shape == (64, 64, 3)
        small = tmp_path / "mask32.png"
        Image.new("L", (32, 32), 255).save(small)
        page.set_input_files("#inp_mask input[type=file]", str(small))
        page.wait_for_selector("#inp_mask img", timeout=30_000)
        page.click("#inp_go")
        page.get_by_text("The mask is 32x32 but the image is 64x64").first.wait_for(timeout=30_000)
      finally:
        browser.close()
    assert proc.poll() is None, "the server stopped after bad input"
    print(f"\nserver start-up (load + warm-up) {startup:.1f} s; first click -> {n} images {first_click:.2f} s")
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=30)
