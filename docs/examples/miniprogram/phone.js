// pages/phone/phone.js: a mini-program page that verifies the user's phone number through wxphone
// (docs/integration.md). It calls `wxphone api`, or the Flask or FastAPI example: the same routes.
"use strict";

const API_BASE = "https://api.example.com"; // your back end, listed in the mini program's request domains
const WAIT_SECONDS = 8; // how long one request waits for the verification
const FOLLOW_SECONDS = 60; // how long the page follows a verification still on its way
const QUOTA_EXHAUSTED = 1400001; // e.detail.errno: the app's paid phone-verification quota is used up
const TAP_AGAIN = ["invalid_code", "code_expired", "reply_lost", "worker_lost", "too_many_attempts"];

let session = null; // the back end's session (never WeChat's session_key), kept in memory

function request(method, path, data) {
  return new Promise((resolve, reject) => {
    wx.request({
      url: API_BASE + path,
      method,
      data,
      header: session ? { Authorization: "Bearer " + session } : {},
      timeout: (WAIT_SECONDS + 10) * 1000,
      success: (res) => resolve({ status: res.statusCode, body: res.data || {} }),
      fail: reject, // no answer at all: no network, a timeout
    });
  });
}

async function logIn() {
  session = null;
  const jsCode = await new Promise((resolve, reject) => {
    wx.login({ success: (res) => resolve(res.code), fail: reject });
  });
  const appid = wx.getAccountInfoSync().miniProgram.appId;
  const reply = await request("POST", "/v1/login", { appid, js_code: jsCode });
  if (reply.status !== 200) throw new Error("login failed: " + reply.body.error_code);
  session = reply.body.session;
}

// A request with the session. A 401 (no session, or an expired one) is answered before anything is
// recorded, so after logging in again the same request goes once more, even with a phone code in it.
async function call(method, path, data) {
  if (!session) await logIn();
  const reply = await request(method, path, data);
  if (reply.status !== 401) return reply;
  await logIn();
  return request(method, path, data);
}

Page({
  data: { state: "idle", masked: "", message: "" }, // state: idle, verifying, verified or unavailable

  onLoad() {
    this.loggingIn = logIn().catch(() => {}); // a failed login is tried again by call()
  },

  async onGetPhoneNumber(e) {
    const { code, errno, errMsg } = e.detail;
    if (!code) {
      // WeChat gave no code: there is nothing to send, and the back end is not called.
      if (errno === QUOTA_EXHAUSTED) {
        // WeChat has shown its own toast (unless phone-number-no-quota-toast="false"); only the
        // operators can fix it, so the button goes away.
        this.setData({ state: "unavailable", message: "Phone verification is not available right now." });
      } else if (typeof errMsg === "string" && errMsg.indexOf("deny") !== -1) {
        this.setData({ message: "You can verify your number later." }); // the user declined
      } else {
        this.setData({ message: "WeChat did not share your number. Please try again." });
      }
      return;
    }
    this.setData({ state: "verifying", message: "" }); // hides the button: one tap, one code
    try {
      await this.loggingIn;
      this.show(await this.verify(code));
    } catch (err) {
      // No answer: the code may or may not have arrived, so it is not sent again.
      this.setData({ state: "idle", message: "No connection. Please tap again." });
    }
  },

  // Sends the code once, then follows its job until it ends (or FOLLOW_SECONDS pass).
  async verify(code) {
    let reply = await call("POST", "/v1/phone", { code, wait_seconds: WAIT_SECONDS });
    const deadline = Date.now() + FOLLOW_SECONDS * 1000;
    while (reply.status === 202 && Date.now() < deadline) {
      reply = await call("GET", "/v1/phone/" + reply.body.job_id + "?wait_seconds=" + WAIT_SECONDS);
    }
    return reply;
  },

  show(reply) {
    const errorCode = reply.body.error_code;
    if (reply.status === 200) {
      this.setData({ state: "verified", masked: reply.body.phone.masked });
    } else if (reply.status === 202) {
      this.setData({ message: "This takes longer than usual; your number is verified in the background." });
    } else if (reply.status === 429) {
      this.setData({ state: "idle", message: "Too many attempts. Please wait a minute and tap again." });
    } else if (TAP_AGAIN.indexOf(errorCode) !== -1) {
      this.setData({ state: "idle", message: "The verification did not go through. Please tap again." });
    } else if (errorCode === "upstream_unavailable" || errorCode === "enqueue_failed") {
      this.setData({ state: "idle", message: "WeChat is busy. Please try again in a few minutes." });
    } else {
      this.setData({ state: "unavailable", message: "Phone verification is not available right now." });
    }
  },
});
