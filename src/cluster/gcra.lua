-- GCRA, as governor decides it, on Redis's clock (README "[cluster]").
-- KEYS[1]: the client's key.
-- ARGV[1]: t, the emission interval (µs); ARGV[2]: tau = t × (burst - 1) (µs);
-- ARGV[3]: n, most requests to count at once (a replica's batch); ARGV[4]:
-- now (µs), or "" for Redis's TIME.
-- Grants as many of the n as fit (1 of 1 is governor's single check).
-- Returns {granted, wait µs until one would be, tat - now µs after}.
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
local earliest = tat - tau
if now < earliest then
  return {0, earliest - now, tat - now}
end
-- Each granted request moves tat by t; it may not pass now + tau + t.
local base = math.max(tat, now)
local fit = math.floor((now + tau - base) / t) + 1
local granted = math.min(n, fit)
local next = base + t * granted
-- Gone once the bucket is full again: an idle client costs nothing.
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now) / 1000) + 1)
return {granted, 0, next - now}
