// Line charts as plain SVG built with DOM calls (no library, nothing fetched).

const NS = "http://www.w3.org/2000/svg";
const W = 480;
const H = 220;
const PAD = { left: 58, right: 12, top: 12, bottom: 34 };

function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

// About `count` round tick values covering [lo, hi].
function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function label(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

// series: [{name, cls, points: [[x, y], ...], dots}] -> an <svg> (role img, titled).
export function lineChart(title, series, xLabel = "step") {
  const pts = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("title", {}, title));
  if (pts.length === 0) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data"));
    return root;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  const axes = svg("g", { class: "axes" });
  for (const t of ticks(y0, y1)) {
    axes.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }));
    axes.append(svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, label(t)));
  }
  for (const t of ticks(x0, x1)) {
    axes.append(svg("text", { x: sx(t), y: H - PAD.bottom + 16, "text-anchor": "middle" }, label(t)));
  }
  axes.append(svg("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom, class: "axis" }));
  axes.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom, class: "axis" }));
  axes.append(svg("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  root.append(axes);
  series.forEach((s, i) => {
    if (s.points.length === 0) return;
    const g = svg("g", { class: "series " + (s.cls || "s" + i), "data-name": s.name, "data-points": s.points.length });
    const d = s.points.map((p, k) => `${k ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    if (!s.dots) g.append(svg("path", { d, class: "line" }));
    if (s.dots || s.points.length === 1) for (const p of s.points) g.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3 }));
    g.append(svg("text", { x: W - PAD.right - 4, y: PAD.top + 12 + 14 * i, "text-anchor": "end", class: "legend" }, s.name));
    root.append(g);
  });
  return root;
}
