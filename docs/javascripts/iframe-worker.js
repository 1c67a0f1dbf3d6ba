// Search from disk: a page opened from file:// may not start a web worker, so Material's search
// worker runs in a hidden same-origin iframe instead (the technique of squidfunk/iframe-worker,
// shipped with the site so that the built pages fetch nothing). Served over http, the real
// Worker is used. Material's worker only calls addEventListener("message") and postMessage.
(function () {
  if (location.protocol !== "file:") return;

  class IFrameWorker extends EventTarget {
    constructor(url) {
      super();
      this.pending = [];
      this.frame = document.createElement("iframe");
      this.frame.hidden = true;
      document.body.appendChild(this.frame);
      const inner = this.frame.contentWindow;
      inner.postMessage = (data) => this.deliver(data);
      inner.importScripts = () => {
        throw new Error("importScripts is not available to a worker started from disk");
      };
      const script = inner.document.createElement("script");
      script.src = new URL(url, location.href).href;
      script.onload = () => {
        const queued = this.pending;
        this.pending = null;
        queued.forEach((data) => this.postMessage(data));
      };
      script.onerror = () => this.dispatchEvent(new ErrorEvent("error", {message: `cannot load ${url}`}));
      inner.document.head.appendChild(script);
    }

    deliver(data) {
      const event = new MessageEvent("message", {data});
      this.dispatchEvent(event);
      if (typeof this.onmessage === "function") this.onmessage(event);
    }

    postMessage(data) {
      if (this.pending) {  // the worker's script has not run yet: nobody listens in the frame
        this.pending.push(data);
        return;
      }
      const inner = this.frame.contentWindow;
      inner.dispatchEvent(new inner.MessageEvent("message", {data}));
    }

    terminate() {
      this.frame.remove();
    }
  }

  window.IFrameWorker = IFrameWorker;
  window.Worker = IFrameWorker;
})();
