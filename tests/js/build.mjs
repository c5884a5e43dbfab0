// Builds the demo page's bundle (/aisdk/): aisdk-chat.mjs with the `ai` package it imports,
// as one ES module, from the versions package-lock.json pins. `npm run build` writes the
// committed file; tests/test_browser_aisdk.py builds it again elsewhere and compares the bytes.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

export const OUTFILE = fileURLToPath(new URL("../../project/static/demo/aisdk-chat.js", import.meta.url));

await build({
  entryPoints: [fileURLToPath(new URL("aisdk-chat.mjs", import.meta.url))],
  outfile: process.argv[2] || OUTFILE,
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  minify: true,
  legalComments: "eof",
  logLevel: "warning",
});
