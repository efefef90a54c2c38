// A picture (video, image or canvas) reduced to its mean colour [r, g, b]: lets tests and
// users check that a parameter change really reached the output. No DOM state of its own.

export function meanColour(source, size = 64) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const context = canvas.getContext("2d");
  context.drawImage(source, 0, 0, size, size);
  const pixels = context.getImageData(0, 0, size, size).data;
  const sum = [0, 0, 0];
  for (let i = 0; i < pixels.length; i += 4) { sum[0] += pixels[i]; sum[1] += pixels[i + 1]; sum[2] += pixels[i + 2]; }
  return sum.map((v) => v / (pixels.length / 4));
}
