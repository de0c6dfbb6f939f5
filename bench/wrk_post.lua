-- wrk script for the Keystile benchmark.
-- Usage: wrk -t1 -cC -dMAX -s bench/wrk_post.lua URL -- STOP_AFTER BODY_FILE [AUTHORIZATION]
--   STOP_AFTER  stop each thread after this many responses (0 = run for the whole -d duration);
--               wrk only knows durations, so this is what makes a case a fixed request count.
--   BODY_FILE   file holding the JSON POST body.
--   AUTHORIZATION  optional value of the Authorization header (e.g. "Bearer sk-...").
-- done() prints one line "WRK_RESULT {json}" that bench/run.py parses.

local ffi = require("ffi")
ffi.cdef[[
int getpid(void);
int kill(int pid, int sig);
]]

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   stop_after = tonumber(args[1]) or 0
   local f = assert(io.open(args[2], "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   if args[3] and args[3] ~= "" then
      wrk.headers["Authorization"] = args[3]
   end
   responses = 0
   non2xx = 0
end

function response(status, headers, body)
   responses = responses + 1
   -- wrk's own summary.errors.status only counts >= 400; count every non-2xx here.
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
   if stop_after > 0 and responses >= stop_after then
      wrk.thread:stop()
      -- thread:stop() alone leaves wrk's main thread sleeping out the whole -d duration.
      -- wrk's SIGINT handler ends that sleep, so the run (and its measured duration) ends
      -- here. Meant for -t1: with more threads the first one to finish ends the run.
      ffi.C.kill(ffi.C.getpid(), 2)
   end
end

function done(summary, latency, requests)
   local responses_total, non2xx_total = 0, 0
   for _, thread in ipairs(threads) do
      responses_total = responses_total + (thread:get("responses") or 0)
      non2xx_total = non2xx_total + (thread:get("non2xx") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"requests": %d, "responses": %d, "duration_us": %d, "bytes": %d, ' ..
      '"non2xx": %d, "err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, ' ..
      '"err_timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
      summary.requests, responses_total, summary.duration, summary.bytes,
      non2xx_total, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max))
end
