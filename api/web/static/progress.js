// A worker's load progress in words, for the status line under the player:
// "downloading stabilityai/sd-turbo · 43% (1.2 of 2.8 GB) · about 12 s left",
// "building the TensorRT engine (minutes the first time) · step 3 of 4".
// Pure functions of the status's `progress` ({stage, done, total, unit, fraction, eta_s});
// no DOM, so the page and a test can both call them.

/** Bytes done and total when the progress counts bytes (`unit: "bytes"`, or the older byte fields). */
export function progressBytes(progress) {
  if (progress.unit === "bytes") return { done: progress.done ?? undefined, total: progress.total ?? undefined };
  const done = progress.bytes ?? progress.bytes_done ?? progress.downloaded_bytes;
  return { done, total: done === undefined ? undefined : progress.total ?? progress.total_bytes ?? progress.bytes_total };
}

/** The fraction done, 0 to 1, or null when unknown (the bar then moves without a value). */
export function progressFraction(progress) {
  const { done, total } = progressBytes(progress);
  const fraction = progress.fraction ?? (done !== undefined && total ? done / total : null);
  return fraction === null || fraction === undefined ? null : Math.min(1, Math.max(0, fraction));
}

/** "1.2 of 2.8 GB", "100 of 400 MB", "25 kB": one unit, the one the larger number reads best in. */
export function byteRange(done, total) {
  const top = total || done;
  const [scale, unit, digits] = top >= 2 ** 30 ? [2 ** 30, "GB", 1] : top >= 2 ** 20 ? [2 ** 20, "MB", 0] : [2 ** 10, "kB", 0];
  const show = (b) => (b / scale).toFixed(digits);
  return total ? `${show(done)} of ${show(total)} ${unit}` : `${show(done)} ${unit}`;
}

/** The whole line: stage, then "43% (1.2 of 2.8 GB)" for bytes or "step 3 of 4" for steps, then the ETA. */
export function progressText(progress) {
  const parts = [progress.stage || progress.message];
  const { done, total } = progressBytes(progress);
  if (progress.unit === "steps" && progress.total) {
    parts.push(`step ${Math.min((progress.done ?? 0) + 1, progress.total)} of ${progress.total}`);
  } else if (done !== undefined) {
    const fraction = progressFraction(progress);
    const percent = fraction === null ? "" : `${Math.floor(fraction * 100)}% `;
    parts.push(total ? `${percent}(${byteRange(done, total)})` : byteRange(done, total));
  }
  const eta = progress.eta_s ?? progress.eta;
  if (eta !== undefined && eta !== null) parts.push(`about ${Math.ceil(eta)} s left`);
  return parts.filter(Boolean).join(" · ");
}
