// The Device timeline chart (uPlot): one series per query, its score per window; the query's threshold as a dashed
// line in the series' colour; the device's events as shaded bands. Drag across it to zoom in, double-click to zoom
// out, hover for the values (uPlot's cursor and legend; a legend entry hides its query). The data is the page's
// #timeline-data, the same as timeline.json.
(function () {
  "use strict";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];
  const HEIGHT = 360; // px: enough for scores in [0, 1] to be read on a phone as on a desk
  const BAND_ALPHA = "33"; // an event band's opacity (hex of 0..255) over its query's colour
  const chart = document.getElementById("timeline-chart");
  if (!chart) return; // nothing to draw: the page says why
  const data = JSON.parse(document.getElementById("timeline-data").textContent);
  const queries = data.queries;
  const color = (i) => COLORS[i % COLORS.length];
  const column = new Map(queries.map((q, i) => [q.id, i + 1])); // query id -> its series index

  function marks(u) {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const px = window.devicePixelRatio || 1;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    for (const e of data.events) {
      const s = column.get(e.query);
      if (s !== undefined && !u.series[s].show) continue;
      const x0 = u.valToPos(e.start_s, "x", true);
      const x1 = u.valToPos(e.end_s, "x", true);
      ctx.fillStyle = (s === undefined ? "#7f7f7f" : color(s - 1)) + BAND_ALPHA;
      ctx.fillRect(x0, top, Math.max(x1 - x0, 2 * px), height);
    }
    ctx.setLineDash([6 * px, 4 * px]);
    ctx.lineWidth = 1.5 * px;
    queries.forEach((q, i) => {
      if (!u.series[i + 1].show) return;
      const y = u.valToPos(q.threshold, "y", true);
      ctx.strokeStyle = color(i);
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(left + width, y);
      ctx.stroke();
    });
    ctx.restore();
  }

  const series = [{ label: "device time (s)" }].concat(
    queries.map((q, i) => ({
      label: `${q.text} (${q.modality}; threshold ${q.threshold})`,
      stroke: color(i),
      width: 1.5,
      spanGaps: true, // the queries' windows need not share times (IMU windows hop otherwise)
      value: (u, v) => (v == null ? "-" : v.toFixed(3)),
    })),
  );
  const options = {
    width: chart.clientWidth,
    height: HEIGHT,
    scales: { x: { time: false }, y: { range: [0, 1] } },
    axes: [{ label: "device time (s)" }, { label: "score" }],
    cursor: { drag: { x: true, y: false } },
    series: series,
    hooks: { draw: [marks] },
  };
  const plot = new uPlot(options, uPlot.join(queries.map((q) => [q.t, q.score])), chart);
  new ResizeObserver(() => plot.setSize({ width: chart.clientWidth, height: HEIGHT })).observe(chart);
  window.bindstreamTimeline = plot; // the drawn chart, for tests and the browser's console
})();
