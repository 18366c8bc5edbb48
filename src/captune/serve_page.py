"""The web page `captune serve` shows at `/`: one self-contained HTML file (inline CSS and JS, no CDN), so it works
offline. `__DEFAULTS__` is replaced with the server's generation defaults and limits as JSON."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>captune</title>
<style>
  :root { font-family: system-ui, sans-serif; color: #1d2330; background: #f6f7f9; }
  main { max-width: 760px; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .muted { color: #5b6475; font-size: .9rem; }
  #drop { display: block; border: 2px dashed #8a94a8; border-radius: 10px; padding: 2rem; text-align: center;
          background: #fff; cursor: pointer; margin: 1rem 0; }
  #drop.over { border-color: #2f6fde; background: #eef4ff; }
  #drop input { display: none; }
  fieldset { border: 1px solid #d5d9e1; border-radius: 8px; display: flex; flex-wrap: wrap; gap: 1rem; }
  label.opt { display: flex; flex-direction: column; font-size: .85rem; }
  label.opt input[type=number] { width: 6rem; }
  button { margin-top: .8rem; padding: .4rem 1rem; }
  #status { min-height: 1.4rem; margin: .8rem 0; }
  #status.error { color: #b3261e; font-weight: 600; }
  #results { list-style: none; padding: 0; }
  #results li { display: flex; gap: 1rem; align-items: flex-start; background: #fff; border-radius: 8px;
                padding: .6rem; margin-bottom: .6rem; box-shadow: 0 1px 2px #0002; }
  #results img, .nopreview { width: 120px; height: 120px; flex: none; object-fit: contain; background: #eee;
                             border-radius: 4px; }
  .nopreview { display: flex; align-items: center; justify-content: center; color: #5b6475; font-size: .8rem; }
  /* Long captions (50-200 words from detailed prompts) wrap, scroll inside their row, and keep the image beside them. */
  .caption { font-size: 1.1rem; margin: 0; line-height: 1.45; max-height: 16rem; overflow: auto;
             overflow-wrap: anywhere; white-space: pre-wrap; }
  .caption.pending { color: #5b6475; font-style: italic; }
  .caption.error { color: #b3261e; font-size: .95rem; }
  #model { margin-top: .3rem; }
  #model code { background: #e8ebf0; padding: 0 .25rem; border-radius: 3px; }
</style>
</head>
<body>
<main>
  <h1>captune</h1>
  <div class="muted">Drop images or pick files; each gets a caption from the model this server runs.</div>
  <div id="model" class="muted"></div>
  <label id="drop">Drop images here or <u>choose files</u>
    <input id="file" type="file" accept="image/*" multiple>
  </label>
  <fieldset>
    <legend>Generation</legend>
    <label class="opt">Beams <input id="num_beams" type="number" min="1" max="8"></label>
    <label class="opt">Max tokens <input id="max_new_tokens" type="number" min="1" max="128"></label>
    <label class="opt">Repetition penalty <input id="repetition_penalty" type="number" min="1" max="10" step="0.1"></label>
    <label class="opt">No-repeat n-gram <input id="no_repeat_ngram_size" type="number" min="0" max="128"></label>
    <label class="opt">Length penalty <input id="length_penalty" type="number" min="-10" max="10" step="0.1"></label>
    <label class="opt">Sampling <input id="do_sample" type="checkbox"></label>
    <label class="opt">Top-p <input id="top_p" type="number" min="0.05" max="1" step="0.05" value="0.9"></label>
    <label class="opt">Temperature <input id="temperature" type="number" min="0.1" max="10" step="0.1" value="1"></label>
  </fieldset>
  <button id="again" type="button" disabled>Caption again</button>
  <div id="status" role="status"></div>
  <ol id="results"></ol>
</main>
<script>
const DEFAULTS = __DEFAULTS__;
const $ = (id) => document.getElementById(id);
const NUMERIC = ["num_beams", "max_new_tokens", "repetition_penalty", "no_repeat_ngram_size", "length_penalty"];
for (const name of NUMERIC) $(name).value = DEFAULTS[name];
let lastFiles = [];

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function describeModel(info) {
  const parts = [info.family || "unknown family"];
  if (info.step !== null && info.step !== undefined) parts.push("step " + info.step);
  parts.push(info.int8 ? "int8" : "not int8", info.device);
  const code = document.createElement("code");
  code.textContent = info.model;
  $("model").replaceChildren("Model: ", code, " (" + parts.join(", ") + ")");
}
describeModel(DEFAULTS.info);

function row(file) {
  const li = document.createElement("li");
  const img = document.createElement("img");
  img.src = URL.createObjectURL(file);
  img.alt = file.name;
  img.addEventListener("error", () => {  // not an image the browser can show: a plain box, not a broken icon
    const box = document.createElement("div");
    box.className = "nopreview";
    box.textContent = "no preview";
    img.replaceWith(box);
  });
  const div = document.createElement("div");
  const p = document.createElement("p");
  p.className = "caption pending";
  p.textContent = "captioning...";
  const meta = document.createElement("div");
  meta.className = "muted";
  meta.textContent = file.name;
  div.append(p, meta);
  li.append(img, div);
  return { li, img, p, meta };
}

// One request per file: a bad file gets its error beside it and costs no other file its caption. The server
// batches concurrent requests on the model, so this is no slower than one request with every file.
async function captionOne(file, parts, options) {
  const form = new FormData();
  form.append("images", file, file.name);
  for (const [key, value] of options) form.append(key, value);
  try {
    const reply = await fetch("/v1/caption", { method: "POST", body: form });
    const body = await reply.json().catch(() => ({ error: "the server answered " + reply.status }));
    if (!reply.ok) throw new Error(body.error || ("the server answered " + reply.status));
    const item = body.captions[0];
    parts.p.className = "caption";
    parts.p.textContent = item.caption;
    parts.img.alt = item.caption;
    parts.meta.textContent = item.filename + " (" + item.width + "x" + item.height + ")";
    return true;
  } catch (err) {
    parts.p.className = "caption error";
    parts.p.textContent = "Error: " + (err.message || err);
    parts.li.classList.add("failed");
    return false;
  }
}

async function caption(files) {
  files = Array.from(files);
  if (!files.length) return;
  const dropped = files.length - DEFAULTS.max_images;
  files = files.slice(0, DEFAULTS.max_images);
  lastFiles = files;
  $("again").disabled = false;
  const options = NUMERIC.map((name) => [name, $(name).value]);
  if ($("do_sample").checked) {
    options.push(["do_sample", "true"], ["top_p", $("top_p").value], ["temperature", $("temperature").value]);
  }
  const started = performance.now();
  setStatus("Captioning " + files.length + " image(s)...", false);
  const rows = files.map(row);
  $("results").replaceChildren(...rows.map((r) => r.li));
  const done = await Promise.all(files.map((file, i) => captionOne(file, rows[i], options)));
  const failed = done.filter((ok) => !ok).length;
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  let text = "Done in " + seconds + " s: " + (files.length - failed) + " captioned";
  if (failed) text += ", " + failed + " failed (the error is shown beside each)";
  if (dropped > 0) text += "; " + dropped + " more file(s) not sent (the limit is " + DEFAULTS.max_images + ")";
  setStatus(text + ".", failed === files.length);
}

$("file").addEventListener("change", (e) => caption(e.target.files));
$("again").addEventListener("click", () => caption(lastFiles));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  caption(e.dataTransfer.files);
});
</script>
</body>
</html>
"""
