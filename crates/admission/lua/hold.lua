-- Holds a limit back until an instant: nothing is admitted against KEYS[1] before ARGV[1].
--
-- KEYS[1]: the limit's state (its TAT in microseconds, as admit.lua keeps it).
-- KEYS[2]: the limit's hold: the instant the hold ends, in microseconds. reserve.lua reads it
--          so that a hold wins over a reservation whose slot it covers.
-- ARGV[1]: the instant to hold until, in microseconds.
-- ARGV[2]: the limit's burst tolerance in microseconds.
-- ARGV[3]: now in microseconds, or '' to use Redis's own clock.
--
-- A hold never shortens an existing one. Returns the TAT now in force.
local now = now_us(ARGV[3])
local _, tat = hold_until(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), now)
return string.format('%.0f', tat)
