-- wrk script of bench/hit_path.py: every request asks for a random container of the hot set
-- with a random credential; done() prints one parseable line.
--
--   wrk -s bench/hit_path.lua URL -- HOT_SET.lua
--
-- HOT_SET.lua (written by hit_path.py) returns {prefix = "/openai/v1/containers/",
-- ids = {...}, keys = {...}, seed = N}. Every (id, key) request is built once in init(), so
-- request() costs wrk a table lookup: the sidecar and the bare handler get the same load.

local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_id", threads)
end

local prebuilt = {}

function init(args)
   local hot = dofile(args[1])
   math.randomseed(hot.seed * 1000 + (thread_id or 0))
   for _, id in ipairs(hot.ids) do
      for _, key in ipairs(hot.keys) do
         prebuilt[#prebuilt + 1] =
            wrk.format("GET", hot.prefix .. id, { ["Authorization"] = "Bearer " .. key })
      end
   end
end

function request()
   return prebuilt[math.random(#prebuilt)]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, '
         .. '"p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, "mean_us": %.1f, '
         .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, '
         .. '"status_errors": %d, "timeouts": %d}\n',
      summary.requests, summary.duration, summary.bytes, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max,
      latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
