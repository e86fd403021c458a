"""Browser side of tests/dashboard.rs: drives the registry dashboard in a
real headless Chromium (the system one, through Playwright) and talks to the
Rust test over stdin/stdout, one line per step:

  -> SEEN prod            the page (after asking for the token) lists prod
  <- registered web       the test registered web/web-1 over gRPC
  -> SEEN web <ms>        it appeared, without a reload, after <ms>
  <- deregistered web     the test deregistered web/web-1
  -> GONE web <ms>
  -> OK                   screenshots written

Any failed expectation raises, prints the reason on stderr and exits 1.
"""

import argparse
import re
import sys
import time

from playwright.sync_api import expect, sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def say(line):
    print(line, flush=True)


def expect_line(want):
    got = sys.stdin.readline().strip()
    if got != want:
        raise SystemExit(f"expected {want!r} from the test, got {got!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--chromium", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        expect.set_options(timeout=10_000)
        page.goto(args.url)

        # Auth is on: the page asks for a token, and keeps it in the tab.
        expect(page.locator("#login")).to_be_visible()
        page.fill("#login-token", args.token)
        page.keyboard.press("Enter")
        expect(page.locator("#login")).to_be_hidden()
        prod = page.locator('#services button[data-service="prod"]')
        expect(prod).to_be_visible()
        expect(prod).to_contain_text("1 passing")
        page.evaluate("window.__notReloaded = true")
        say("SEEN prod")

        # Keyboard: "/" focuses the filter, arrows move into the list,
        # Enter opens the service.
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "services-search"
        page.keyboard.type("pro")
        page.keyboard.press("ArrowDown")
        assert page.evaluate("document.activeElement.dataset.service") == "prod"
        page.keyboard.press("Enter")
        expect(page.locator("#detail-title")).to_have_text("prod")
        row = page.locator('#instances tbody tr[data-id="prod-1"]')
        expect(row).to_contain_text("10.0.0.1:8002")
        expect(row).to_contain_text("version=1.4.2")
        expect(row).to_contain_text("passing")
        lease = row.locator("td.lease")
        expect(lease).to_have_text(re.compile(r"^\d+ s$"))
        first = int(lease.inner_text().split()[0])
        page.wait_for_timeout(2200)
        later = int(lease.inner_text().split()[0])
        assert later < first, f"lease time left counts down: {first} then {later}"
        page.keyboard.press("/")
        page.keyboard.press("Escape")
        assert page.locator("#services-search").input_value() == ""

        # Live: a service registered over gRPC appears without a reload.
        expect_line("registered web")
        t0 = time.monotonic()
        web = page.locator('#services button[data-service="web"]')
        expect(web).to_be_visible()
        seen_ms = int((time.monotonic() - t0) * 1000)
        expect(page.locator("#events")).to_contain_text("PUT")
        expect(page.locator("#events")).to_contain_text("web/web-1")
        assert page.evaluate("window.__notReloaded === true"), "the page reloaded"
        say(f"SEEN web {seen_ms}")

        expect_line("deregistered web")
        t0 = time.monotonic()
        expect(web).to_have_count(0)
        gone_ms = int((time.monotonic() - t0) * 1000)
        expect(page.locator("#events")).to_contain_text("(deregistered)")
        assert page.evaluate("window.__notReloaded === true"), "the page reloaded"
        say(f"GONE web {gone_ms}")

        expect(page.locator("#live")).to_have_text("live")
        page.screenshot(path=f"{args.out}/dashboard-desktop.png", full_page=True)

        # Phone width: one column, nothing wider than the screen.
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(200)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
        page.screenshot(path=f"{args.out}/dashboard-phone.png", full_page=True)

        assert not errors, f"script errors on the page: {errors}"
        browser.close()
    say("OK")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report any failure to the test
        print(f"dashboard.py failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
