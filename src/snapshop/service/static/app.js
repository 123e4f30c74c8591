/* snapshop web page: upload a photo, see detected garments, search the whole photo or a box;
   /p/{id} (and "More like this" on any result) shows a catalog product with its similar
   products. Plain JS, no build step; talks to the /v1 REST API of the same origin.
   Catalog text is shown with textContent only (titles can hold anything). */
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_SIDE = 1600;            // downscale big camera photos before upload
  const POSITION_NAMES = { upper: "Upper garment", lower: "Lower garment", box: "Your box" };
  const SHORT_NAMES = { upper: "Upper", lower: "Lower", box: "Your box" };
  const ORDER = { upper: 0, lower: 1, box: 2 };
  const COLORS = { upper: "var(--upper)", lower: "var(--lower)", box: "var(--box)" };

  const state = { blob: null, size: null, url: null, first: null, selected: null, drawing: false, busy: 0, product: null };
  const PRODUCT_PATH = /^\/p\/(\d+)\/?$/;

  // ---------------------------------------------------------------- status
  function setStatus(text, kind) {
    const el = $("status");
    el.className = "status" + (kind ? " " + kind : "");
    el.replaceChildren();
    if (kind === "loading") {
      const spin = document.createElement("span");
      spin.className = "spinner";
      spin.setAttribute("aria-hidden", "true");
      el.append(spin);
    }
    if (text) el.append(document.createTextNode(text));
    el.dataset.state = kind || "idle";
  }

  // An error whose message is written for people; any other error is a fault of the page or
  // an answer it cannot read, and shows as UNREADABLE rather than as a JavaScript message.
  class ApiProblem extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }
  const UNREADABLE = "The server sent an answer this page cannot read. Please try again.";
  // A proxy in front of the service answers with its own HTML page, and over HTTP/2 with no
  // status text at all: say what the status means rather than show nothing.
  const STATUS_MESSAGES = {
    408: "The upload took too long. Check your connection and try again.",
    413: "That photo is too large for the server. Try a smaller one.",
    429: "The server is busy, please retry in a moment.",
    502: "The server is unavailable right now. Please try again shortly.",
    503: "The server is unavailable right now. Please try again shortly.",
    504: "The server took too long to answer. Please try again.",
  };

  function problemText(err) {
    if (err instanceof ApiProblem) return err.message;
    console.error(err);
    return UNREADABLE;
  }

  async function api(path, form) {
    let res;
    try {
      res = await fetch(path, form ? { method: "POST", body: form } : {});
    } catch (err) {
      throw new ApiProblem("Cannot reach the server. Check your connection and try again.", 0);
    }
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    if (!res.ok) {
      const detail = body && typeof body.detail === "string" && body.detail.trim() ? body.detail : null;
      const text = (res.status !== 429 && detail) || STATUS_MESSAGES[res.status]
        || `The server answered ${res.status} ${res.statusText}`.trim() + ".";
      throw new ApiProblem(text, res.status);
    }
    if (body === null || typeof body !== "object") throw new ApiProblem(UNREADABLE, res.status);
    return body;
  }

  // ---------------------------------------------------------------- stats
  async function loadStats() {
    try {
      const s = await api("/v1/stats");
      $("stats").textContent = `${s.products.toLocaleString()} products · ${s.images.toLocaleString()} images`;
    } catch (_) { /* the page still works without stats */ }
  }

  // ---------------------------------------------------------------- filters
  function addFilters(form) {  // a FormData (searches) or URLSearchParams (more like this)
    const k = $("f-k").value;
    if (k) form.append("k", k);
    const cat = $("f-category").value.trim();
    if (cat) form.append("category", cat);
    for (const [id, name] of [["f-min", "min_price"], ["f-max", "max_price"]]) {
      const v = $(id).value.trim();
      if (v !== "") form.append(name, v);
    }
  }

  // ---------------------------------------------------------------- upload
  async function prepare(file) {
    // Large photos are scaled down (EXIF orientation applied) so uploads stay fast on phones.
    if (!("createImageBitmap" in window) || file.size < 1.5e6) return file;
    try {
      const bmp = await createImageBitmap(file, { imageOrientation: "from-image" });
      const scale = Math.min(1, MAX_SIDE / Math.max(bmp.width, bmp.height));
      if (scale === 1 && file.size < 8e6) { bmp.close(); return file; }
      const canvas = document.createElement("canvas");
      canvas.width = Math.round(bmp.width * scale);
      canvas.height = Math.round(bmp.height * scale);
      canvas.getContext("2d").drawImage(bmp, 0, 0, canvas.width, canvas.height);
      bmp.close();
      const blob = await new Promise((ok) => canvas.toBlob(ok, "image/jpeg", 0.9));
      return blob || file;
    } catch (_) {
      return file; // the browser cannot decode it: let the server judge
    }
  }

  async function handleFile(file) {
    if (!file) return;
    if (file.size === 0) { setStatus("That file is empty.", "error"); return; }
    setStatus("Preparing photo…", "loading");
    const blob = await prepare(file);
    state.blob = blob;
    state.selected = null;
    state.first = null;
    if (state.url) URL.revokeObjectURL(state.url);
    state.url = URL.createObjectURL(blob);
    if (state.product !== null) {  // a photo dropped or pasted on a product page
      history.pushState({}, "", "/");
      showSearchView();
    }
    const img = $("query-img");
    img.src = state.url;
    $("welcome").hidden = true;
    $("query").hidden = false;
    $("overlay").replaceChildren();
    await searchWhole();
  }

  // ---------------------------------------------------------------- searches
  async function searchWhole() {
    if (!state.blob) return;
    const form = new FormData();
    form.append("image", state.blob, "query.jpg");
    addFilters(form);
    const token = ++state.busy;
    setStatus("Searching the catalog…", "loading");
    document.body.setAttribute("aria-busy", "true");
    try {
      const res = await api("/v1/search", form);
      if (token !== state.busy) return;
      state.first = res;
      state.size = res.query_size;
      state.selected = null;
      $("all-btn").hidden = true;
      drawBoxes(res.item_results);
      renderImageResults(res.image_results);
      renderItemResults(res.item_results, false);
      const n = res.item_results.length;
      setStatus(`Found ${res.image_results.length} similar products` +
        (n ? ` and ${n} garment${n > 1 ? "s" : ""} in your photo` : "") +
        ` (${Math.round(res.timings_ms.request)} ms).`);
    } catch (err) {
      if (token !== state.busy) return;
      setStatus(problemText(err), "error");
      $("image-results").hidden = true;
      $("item-results").hidden = true;
    } finally {
      if (token === state.busy) document.body.removeAttribute("aria-busy");
    }
  }

  async function searchBox(box, position, label, what) {
    what = what || "your box";
    if (!state.blob) return;
    const form = new FormData();
    form.append("image", state.blob, "query.jpg");
    ["x1", "y1", "x2", "y2"].forEach((key, i) => form.append(key, box[i].toFixed(1)));
    if (position && position !== "box") form.append("position", position);
    addFilters(form);
    const token = ++state.busy;
    setStatus(`Searching ${what}…`, "loading");
    try {
      const res = await api("/v1/search/crop", form);
      if (token !== state.busy) return;
      state.selected = { box, position, label, what };
      markSelected();
      const results = res.item_results.map((r) => ({ ...r, position: position || "box", label: label || r.label }));
      renderItemResults(results, true);
      $("all-btn").hidden = !(state.first && state.first.item_results.length);
      const hits = results.length ? results[0].results.length : 0;
      setStatus(`Found ${hits} items like ${what} (${Math.round(res.timings_ms.request)} ms).`);
      $("item-results").scrollIntoView({ behavior: "smooth", block: "nearest" });
    } catch (err) {
      if (token !== state.busy) return;
      setStatus(problemText(err), "error");
    }
  }

  // ---------------------------------------------------------------- overlay
  function svgEl(name, attrs) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    return el;
  }

  function pretty(label) { return String(label || "").replaceAll("_", " "); }

  function unitsPerPixel() {
    // image pixels per CSS pixel, so labels read the same size on any screen
    const img = $("query-img");
    const shown = img.clientWidth || img.width;
    return shown && state.size ? state.size[0] / shown : Math.max(...(state.size || [500])) / 500;
  }

  function sortItems(items) {
    return [...items].sort((a, b) => (ORDER[a.position] ?? 9) - (ORDER[b.position] ?? 9));
  }

  function drawBoxes(items) {
    items = sortItems(items);
    const svg = $("overlay");
    // a redraw (resize, image load) replaces the boxes; keep keyboard focus on the same garment
    const active = document.activeElement;
    const refocus = active && svg.contains(active) ? active.dataset.position : null;
    svg.replaceChildren();
    if (!state.size) return;
    const [w, h] = state.size;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    const scale = unitsPerPixel();
    items.forEach((item, i) => {
      const [x1, y1, x2, y2] = item.box;
      const color = COLORS[item.position] || COLORS.box;
      const name = POSITION_NAMES[item.position] || pretty(item.position);
      const short = SHORT_NAMES[item.position] || name;
      const detail = item.label && item.label !== "drawn" ? ` · ${pretty(item.label)}` : "";
      const text = `${short}${detail} ${Math.round(item.score * 100)}%`;
      const g = svgEl("g", {
        class: "box", tabindex: "0", role: "button", "data-position": item.position,
        "data-testid": "box", "aria-label": `Search ${name}${detail}, ${Math.round(item.score * 100)}% confidence`,
      });
      g.dataset.index = String(i);
      g.append(svgEl("rect", { class: "frame", x: x1, y: y1, width: x2 - x1, height: y2 - y1, stroke: color, rx: 4 * scale }));
      svg.append(g);
      const th = 20 * scale;
      const ty = y1 - th >= 0 ? y1 - th : y1;
      const t = svgEl("text", { x: 0, y: ty + 14 * scale, "font-size": 12 * scale });
      t.textContent = text;
      g.append(t);
      let tw = 12 * scale;
      try { tw += t.getComputedTextLength(); } catch (_) { tw += text.length * 7 * scale; }
      const tx = Math.max(0, Math.min(x1, w - tw));
      t.setAttribute("x", tx + 6 * scale);
      g.insertBefore(svgEl("rect", { class: "tag-bg", x: tx, y: ty, width: tw, height: th, fill: color, rx: 3 * scale }), t);
      const go = () => searchBox(item.box, item.position, item.label, `the ${name.toLowerCase()}`);
      g.addEventListener("click", (e) => { if (!state.drawing) { e.stopPropagation(); go(); } });
      g.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); }
      });
    });
    if (refocus) {
      const again = svg.querySelector(`.box[data-position='${refocus}']`);
      if (again) again.focus({ preventScroll: true });
    }
    $("box-hint").textContent = items.length
      ? "Select a box to search just that garment, or draw your own."
      : "No garments detected. Use “Draw a box” to search part of the photo.";
  }

  function markSelected() {
    const sel = state.selected;
    document.querySelectorAll("#overlay .box").forEach((g) => {
      const on = sel && g.dataset.position === sel.position;
      g.classList.toggle("selected", Boolean(on));
      g.classList.toggle("dim", Boolean(sel) && !on);
    });
  }

  // user-drawn boxes (mouse, pen or touch)
  function toImage(evt) {
    const r = $("overlay").getBoundingClientRect();
    const [w, h] = state.size;
    return [
      Math.min(w, Math.max(0, ((evt.clientX - r.left) / r.width) * w)),
      Math.min(h, Math.max(0, ((evt.clientY - r.top) / r.height) * h)),
    ];
  }

  function setDrawing(on) {
    state.drawing = on;
    $("draw-btn").setAttribute("aria-pressed", String(on));
    $("stage").classList.toggle("drawing", on);
    if (on) setStatus("Drag over the photo to draw a box.");
  }

  function initDrawing() {
    const svg = $("overlay");
    let start = null;
    let draft = null;
    svg.addEventListener("pointerdown", (e) => {
      if (!state.drawing || !state.size) return;
      e.preventDefault();
      svg.setPointerCapture(e.pointerId);
      start = toImage(e);
      draft = svgEl("rect", { class: "draft", x: start[0], y: start[1], width: 0, height: 0 });
      svg.append(draft);
    });
    svg.addEventListener("pointermove", (e) => {
      if (!start) return;
      const [x, y] = toImage(e);
      draft.setAttribute("x", Math.min(x, start[0]));
      draft.setAttribute("y", Math.min(y, start[1]));
      draft.setAttribute("width", Math.abs(x - start[0]));
      draft.setAttribute("height", Math.abs(y - start[1]));
    });
    const finish = (e) => {
      if (!start) return;
      const [x, y] = toImage(e);
      const box = [Math.min(x, start[0]), Math.min(y, start[1]), Math.max(x, start[0]), Math.max(y, start[1])];
      start = null;
      const minSide = Math.max(8, Math.min(...state.size) * 0.03);
      if (box[2] - box[0] < minSide || box[3] - box[1] < minSide) {
        draft.remove();
        setStatus("That box is too small — drag a larger one.", "error");
        return;
      }
      draft.remove();
      const old = svg.querySelector(".box[data-position='box']");
      if (old) old.remove();
      setDrawing(false);
      const items = (state.first ? state.first.item_results : []).concat([{ position: "box", label: "drawn", score: 1, box }]);
      drawBoxes(items);
      searchBox(box, "box", "drawn", "your box");
    };
    svg.addEventListener("pointerup", finish);
    svg.addEventListener("pointercancel", () => { if (draft) draft.remove(); start = null; });
  }

  // ---------------------------------------------------------------- results
  function money(price, currency) {
    if (price === null || price === undefined) return "";
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: currency || "EUR" }).format(price);
    } catch (_) {
      return `${price.toFixed(2)} ${currency || ""}`.trim();
    }
  }

  function card(hit) {
    const node = $("card-tpl").content.firstElementChild.cloneNode(true);
    const link = node.querySelector(".card-link");
    // only web addresses: a javascript: link stored before urls were checked must not run here
    const external = /^https?:\/\//i.test(hit.url || "");
    const productPage = `/p/${encodeURIComponent(hit.product_id)}`;
    link.href = external ? hit.url : productPage;
    if (external) { link.target = "_blank"; link.rel = "noopener noreferrer"; }
    const title = hit.title || hit.sku;
    const price = money(hit.price, hit.currency);
    const pct = `${Math.round(Math.max(0, hit.score) * 100)}% match`;
    link.setAttribute("aria-label", [title, price, pct].filter(Boolean).join(", "));
    const img = node.querySelector("img");
    // an item hit shows the garment that matched, cut from its photo, not the whole photo
    img.src = hit.crop_thumbnail_url || hit.thumbnail_url;
    img.alt = hit.crop_thumbnail_url ? `${title} (the matching item)` : title;
    if (hit.crop_thumbnail_url) node.classList.add("crop");
    const more = node.querySelector(".more");
    more.href = productPage;
    more.setAttribute("aria-label", `More like ${title}`);
    more.addEventListener("click", (e) => {
      if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;  // new tab
      e.preventDefault();
      openProduct(hit.product_id);
    });
    node.querySelector(".title").textContent = title;
    node.querySelector(".price").textContent = price;
    node.querySelector(".score").textContent = pct;
    node.dataset.testid = "card";
    node.dataset.productId = String(hit.product_id);
    return node;
  }

  function empty(text) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = text;
    return p;
  }

  function renderImageResults(hits) {
    const grid = $("image-grid");
    grid.replaceChildren(...(hits.length ? hits.map(card) : [empty("No similar products found. Try another photo or relax the filters.")]));
    $("image-results").hidden = false;
  }

  function renderItemResults(items, selected, none) {
    items = sortItems(items);
    const rows = $("item-rows");
    rows.replaceChildren();
    if (!items.length) {
      rows.append(empty(none || "No garments detected in this photo. Draw a box on the photo to search one part of it."));
    }
    for (const item of items) {
      const wrap = document.createElement("div");
      wrap.className = "item-row";
      wrap.dataset.position = item.position;
      wrap.dataset.testid = "item-row";
      const head = document.createElement("h3");
      head.className = "row-head";
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.style.background = COLORS[item.position] || COLORS.box;
      head.append(chip, document.createTextNode(
        `${POSITION_NAMES[item.position] || pretty(item.position)}` +
        (item.label && item.label !== "user_box" && item.label !== "drawn" ? ` · ${pretty(item.label)}` : "") +
        (selected ? " (selected)" : "")));
      const row = document.createElement("div");
      row.className = "row";
      row.setAttribute("role", "list");
      const cards = item.results.map((h) => { const c = card(h); c.setAttribute("role", "listitem"); return c; });
      if (cards.length) row.append(...cards);
      else row.append(empty("No similar items for this garment."));
      wrap.append(head, row);
      rows.append(wrap);
    }
    $("item-results").hidden = false;
  }

  // ---------------------------------------------------------------- product page (/p/{id})
  function setProductMode(on) {
    $("product").hidden = !on;
    $("upload").hidden = on;
    $("image-results-hint").hidden = !on;
    $("item-results-hint").hidden = !on;
    if (on) {
      $("query").hidden = true;
      $("welcome").hidden = true;
    }
  }

  function showSearchView() {
    state.product = null;
    ++state.busy;  // a product request still in flight must not render over the search
    setProductMode(false);
    document.title = "snapshop · visual search";
    const searched = Boolean(state.first);
    $("query").hidden = !state.blob;
    $("welcome").hidden = Boolean(state.blob);
    $("image-results").hidden = !searched;
    $("item-results").hidden = !searched;
    if (searched) {
      renderImageResults(state.first.image_results);
      const sel = state.selected;
      if (sel) searchBox(sel.box, sel.position, sel.label, sel.what);
      else renderItemResults(state.first.item_results, false);
    }
    setStatus("");
  }

  function openProduct(id) {
    history.pushState({ product: id }, "", `/p/${encodeURIComponent(id)}`);
    showProduct(id, true);
  }

  function renderProduct(p) {
    const title = p.title || p.sku;
    document.title = `${title} · snapshop`;
    $("product-title").textContent = title;
    $("product-category").textContent = p.category || "";
    $("product-price").textContent = money(p.price, p.currency);
    $("product-sku").textContent = `SKU ${p.sku}`;
    const link = $("product-link");
    const external = /^https?:\/\//i.test(p.url || "");
    link.hidden = !external;
    if (external) link.href = p.url; else link.removeAttribute("href");
    const gallery = $("product-gallery");
    gallery.replaceChildren(...p.images.map((image, i) => {
      const img = document.createElement("img");
      img.src = image.thumbnail_url.replace(/size=\d+/, "size=512");
      img.alt = p.images.length > 1 ? `${title}, photo ${i + 1} of ${p.images.length}` : title;
      img.width = image.width;
      img.height = image.height;
      img.dataset.testid = "product-image";
      return img;
    }));
    if (!p.images.length) gallery.append(empty("No photos."));
  }

  async function showProduct(id, focus) {
    state.product = id;
    setProductMode(true);
    const token = ++state.busy;
    setStatus("Finding similar products…", "loading");
    document.body.setAttribute("aria-busy", "true");
    const query = new URLSearchParams();
    addFilters(query);
    try {
      const [product, res] = await Promise.all([
        api(`/v1/products/${encodeURIComponent(id)}`),
        api(`/v1/products/${encodeURIComponent(id)}/similar?${query}`),
      ]);
      if (token !== state.busy) return;
      renderProduct(product);
      renderImageResults(res.image_results);
      renderItemResults(res.item_results, false, "This product has no garment crops, so there are no item results.");
      const n = res.item_results.length;
      setStatus(`${res.image_results.length} products look like this one` +
        (n ? `; similar items for ${n} garment${n > 1 ? "s" : ""}` : "") +
        ` (${Math.round(res.timings_ms.request)} ms).`);
      if (focus) {
        window.scrollTo({ top: 0, behavior: "instant" });
        $("product-title").focus({ preventScroll: true });
      }
    } catch (err) {
      if (token !== state.busy) return;
      $("product-title").textContent = err.status === 404 ? "Product not found" : "Product unavailable";
      $("product-gallery").replaceChildren();
      for (const id of ["product-category", "product-price", "product-sku"]) $(id).textContent = "";
      $("product-link").hidden = true;
      $("image-results").hidden = true;
      $("item-results").hidden = true;
      setStatus(problemText(err), "error");
    } finally {
      if (token === state.busy) document.body.removeAttribute("aria-busy");
    }
  }

  function route() {
    const m = PRODUCT_PATH.exec(location.pathname);
    if (m) showProduct(m[1], false);  // the digits as typed: Number() rounds a long id to another
    else if (state.product !== null) showSearchView();
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    const pick = $("file-input");
    const cam = $("camera-input");
    $("pick-btn").addEventListener("click", () => pick.click());
    $("camera-btn").addEventListener("click", () => cam.click());
    for (const input of [pick, cam]) {
      input.addEventListener("change", () => { handleFile(input.files[0]); input.value = ""; });
    }
    const zone = $("dropzone");
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("dragover"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, () => zone.classList.remove("dragover")));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) handleFile(file);
    });
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => e.preventDefault());
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
      if (item) handleFile(item.getAsFile());
    });
    $("filters").addEventListener("submit", (e) => {
      e.preventDefault();
      if (state.product !== null) { showProduct(state.product, false); return; }
      const sel = state.selected;
      if (sel) searchBox(sel.box, sel.position, sel.label, sel.what);
      else searchWhole();
    });
    $("draw-btn").addEventListener("click", () => setDrawing(!state.drawing));
    $("all-btn").addEventListener("click", () => {
      if (!state.first) return;
      state.selected = null;
      drawBoxes(state.first.item_results);
      renderItemResults(state.first.item_results, false);
      $("all-btn").hidden = true;
      setStatus("Showing items for every garment.");
    });
    $("new-btn").addEventListener("click", () => pick.click());
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.drawing) setDrawing(false); });
    initDrawing();
    loadStats();
    $("back-link").addEventListener("click", (e) => {
      if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
      e.preventDefault();
      history.pushState({}, "", "/");
      showSearchView();
    });
    window.addEventListener("popstate", route);
    route();
    let pending = null;
    const redraw = () => {
      if (!state.first) return;
      const items = state.first.item_results.slice();
      if (state.selected && state.selected.position === "box") {
        items.push({ position: "box", label: "drawn", score: 1, box: state.selected.box });
      }
      drawBoxes(items);
      markSelected();
    };
    window.addEventListener("resize", () => { clearTimeout(pending); pending = setTimeout(redraw, 150); });
    $("query-img").addEventListener("load", redraw);
  }

  init();
})();
