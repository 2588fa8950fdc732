// Drives the demo page in a real browser (Debian's Chromium through playwright-core) as a user
// would: ask, drop the connection, reload mid-answer, open a second tab, stop.
// node demo_page.mjs <base url> <chromium path> <prompt>
// Prints one JSON line with what each step ended with (state and text).
import { chromium } from "playwright-core";

const [base, executablePath, prompt] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const context = await browser.newContext();
const page = await context.newPage();
const results = {};
const problems = [];
context.on("page", (p) => p.on("pageerror", (e) => problems.push(e.message)));
page.on("pageerror", (e) => problems.push(e.message));
page.on("response", (r) => { if (r.status() >= 400) problems.push(`${r.request().method()} ${r.url()}: ${r.status()}`); });

const state = (p) => p.locator("#state").getAttribute("data-state");
const text = (p) => p.locator("#answer").textContent();
const until = async (p, wanted) => {
  try {
    await p.waitForFunction((w) => w.includes(document.getElementById("state").dataset.state), wanted, { timeout: 30000 });
  } catch (error) {
    // What the page said, for whoever reads the failure.
    console.error(`waiting for ${wanted}: state ${await state(p)}; log:\n${await p.locator("#log").textContent()}\nproblems: ${problems.join("; ")}`);
    throw error;
  }
  return { state: await state(p), text: await text(p) };
};
const answerLongerThan = (p, n) =>
  p.waitForFunction((k) => document.getElementById("answer").textContent.length > k, n, { timeout: 30000 });

const asked = (p) => p.evaluate(() => (JSON.parse(localStorage.getItem("tokenrelay-demo") || "{}").id || null));

async function ask(p, maxTokens) {
  const before = await asked(p);
  await p.fill("#prompt", prompt);
  await p.fill("#max", String(maxTokens));
  await p.click("#go");
  // The page follows the new answer once the POST is answered.
  await p.waitForFunction(
    (old) => (JSON.parse(localStorage.getItem("tokenrelay-demo") || "{}").id || null) !== old,
    before,
    { timeout: 30000 },
  );
}

await page.goto(base + "/");

// 1. Drop the connection mid-answer: the page resumes after the last event it saw.
await ask(page, 120);
await answerLongerThan(page, 40);
await page.click("#drop");
results.dropped = await until(page, ["done"]);

// 2. Reload mid-answer: the answer is followed again from where this browser had it.
await ask(page, 150);
await answerLongerThan(page, 40);
await page.reload();
results.reloaded = await until(page, ["done"]);

// 3. A second tab while it streams: it shows the same answer.
await ask(page, 150);
await answerLongerThan(page, 20);
const second = await context.newPage();
await second.goto(base + "/");
results.first_tab = await until(page, ["done"]);
results.second_tab = await until(second, ["done"]);

// 4. Stop: the generation is cancelled, for every reader.
await ask(page, 1000);
await answerLongerThan(page, 20);
results.ask_while_streaming = await page.isEnabled("#go");  // one answer at a time
await page.click("#stop");
results.stopped = await until(page, ["cancelled"]);
results.stopped_second_tab = await until(second, ["cancelled"]);

results.ask_after_stopping = await page.isEnabled("#go");
console.log(JSON.stringify(results));
await browser.close();
