// Live charts of the last minutes (uPlot, vendored: /static/uplot-1.6.32.*).

export const WINDOW_S = 300; // five minutes of one-second samples

export class Chart {
  /** series: [{label, stroke}]; the data (x: seconds since the epoch) is kept in this.data. */
  constructor(root, title, series, unit) {
    this.root = root;
    this.data = [[], ...series.map(() => [])];
    const width = () => Math.max(200, root.clientWidth || 300);
    this.plot = new window.uPlot({
      title,
      width: width(),
      height: 140,
      scales: { x: { time: true, range: (u, min, max) => (max - min < 30 ? [max - 30, max] : [min, max]) } },
      series: [{}, ...series.map((s) => ({ label: s.label, stroke: s.stroke, width: 1.5, spanGaps: false,
                                              value: (u, v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} ${unit}`) }))],
      axes: [{ stroke: "#999", grid: { stroke: "#2a2a2a" } },
             { stroke: "#999", grid: { stroke: "#2a2a2a" }, size: 44 }],
      legend: { live: false },
    }, this.data, root);
    new ResizeObserver(() => this.plot.setSize({ width: width(), height: 140 })).observe(root);
  }

  push(t, values) {
    this.data[0].push(t);
    values.forEach((v, i) => this.data[i + 1].push(v === undefined ? null : v));
    while (this.data[0].length && this.data[0][0] < t - WINDOW_S) for (const column of this.data) column.shift();
    this.plot.setData(this.data);
  }

  clear() {
    for (const column of this.data) column.length = 0;
    this.plot.setData(this.data);
  }
}
