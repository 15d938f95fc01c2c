-- GCRA, as governor decides it, on Redis's clock (README "[cluster]").
-- KEYS[1]: the client's key.
-- ARGV[1]: t, the emission interval (µs); ARGV[2]: tau = t × (burst - 1) (µs);
-- ARGV[3]: n, requests counted at once; ARGV[4]: now (µs) or "" for TIME.
-- Returns {allowed (1/0), wait µs until allowed, tat - now µs after}.
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now
if ARGV[4] ~= "" then
  now = tonumber(ARGV[4])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local extra = t * (n - 1)
local earliest = tat + extra - tau
if now < earliest then
  return {0, earliest - now, tat - now}
end
local next = math.max(tat, now) + t + extra
-- Gone once the bucket is full again: an idle client costs nothing.
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now) / 1000) + 1)
return {1, 0, next - now}
