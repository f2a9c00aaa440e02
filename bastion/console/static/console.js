// Bastion console: the Copy button of a new key. No inline script anywhere (the
// Content-Security-Policy forbids it), so behaviour is attached here, by data attribute.
"use strict";
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  const done = document.getElementById(button.dataset.copy + "-copied");
  navigator.clipboard.writeText(source.textContent.trim()).then(
    () => { if (done) done.hidden = false; },
    () => { // no clipboard (an http page not on localhost): select it for Ctrl-C
      const range = document.createRange();
      range.selectNodeContents(source);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    },
  );
});
