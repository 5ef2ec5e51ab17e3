// Sizing the console to what is visible. On phones the on-screen keyboard
// covers the bottom of the layout viewport; the console follows the visual
// viewport instead, so the prompt (and the extra-keys bar) stay above the
// keyboard. CSS says 100dvh where visualViewport is missing.

export function followVisualViewport(page: HTMLElement, changed: () => void): void {
  const vv = window.visualViewport;
  if (!vv) return;
  const apply = (): void => {
    // Times the scale: pinch-zooming must not shrink the console; only the
    // keyboard (which leaves the scale alone) does.
    const height = Math.round(vv.height * vv.scale);
    const px = height + 'px';
    if (page.style.height !== px) {
      page.style.height = px; // CSSOM, not a style attribute: allowed by the CSP
      changed();
    }
    // Browsers that scrolled the page to show the focused input would hide
    // the top bar: the console fits the visible part, so no scroll is needed.
    if (window.scrollY !== 0 && vv.scale === 1) window.scrollTo(0, 0);
  };
  vv.addEventListener('resize', apply);
  apply();
}
