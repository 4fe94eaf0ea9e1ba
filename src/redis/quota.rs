//! Calendar quotas: `"100000/month"`, `"/day"` or `"/hour"` per lineage, counted fleet-wide in
//! Redis and reset on UTC calendar boundaries computed from Redis `TIME` inside the script
//! (never a node's clock, THREATS L9). The counter of one period is
//! `<prefix>q:<lineage>:<period>:<limit>:<period start>` and expires an hour after the period.
//! Units: only `month`, `day`, `hour` (no abbreviations, so `m` never means month or minute).

use super::resp::Value;
use super::script::Script;
use super::{Client, RedisError};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    Hour,
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// Nominal length, for `RateLimit-Policy` (a month counts as 30 days there; the reset
    /// itself follows the real calendar).
    pub fn secs(self) -> u64 {
        match self {
            Period::Hour => 3600,
            Period::Day => 86_400,
            Period::Month => 30 * 86_400,
        }
    }
}

/// A parsed quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub limit: u64,
    pub period: Period,
}

impl Quota {
    /// `"N/month"`, `"N/day"`, `"N/hour"`; nothing else.
    pub fn parse(s: &str) -> Result<Quota, String> {
        let bad =
            || format!("bad quota {s:?}: use N/month, N/day or N/hour, e.g. \"100000/month\"");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let limit: u64 = n.trim().parse().map_err(|_| bad())?;
        if limit == 0 {
            return Err(format!("bad quota {s:?}: must allow at least 1 request"));
        }
        let period = match unit.trim() {
            "month" => Period::Month,
            "day" => Period::Day,
            "hour" => Period::Hour,
            _ => return Err(bad()),
        };
        Ok(Quota { limit, period })
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.limit, self.period.as_str())
    }
}

/// The counter name of `lineage`'s quota `q` (the script appends the period start).
pub fn key(prefix: &str, lineage: &str, q: Quota) -> String {
    format!("{prefix}q:{lineage}:{}:{}", q.period.as_str(), q.limit)
}

/// Take up to ARGV[3] units (ARGV[1] period, ARGV[2] limit), or give ARGV[3] back to the
/// period starting ARGV[5] when ARGV[4] == "give". Returns {granted, remaining, seconds until
/// the reset, period start, used}. Month boundaries use the civil-from-days algorithm
/// (proleptic Gregorian, UTC).
static QUOTA: Script = Script::new(
    r#"
local now = tonumber(redis.call('TIME')[1])
local p = ARGV[1]
local start, stop
if p == 'hour' then
  start = now - now % 3600; stop = start + 3600
elseif p == 'day' then
  start = now - now % 86400; stop = start + 86400
else
  local days = math.floor(now / 86400)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  start = (days - (d - 1)) * 86400
  local ny, nm = y, m + 1
  if nm > 12 then nm = 1; ny = ny + 1 end
  if nm <= 2 then ny = ny - 1 end
  local era2 = math.floor(ny / 400)
  local yoe2 = ny - era2 * 400
  local mm = nm > 2 and nm - 3 or nm + 9
  local doe2 = yoe2 * 365 + math.floor(yoe2 / 4) - math.floor(yoe2 / 100) + math.floor((153 * mm + 2) / 5)
  stop = (era2 * 146097 + doe2 - 719468) * 86400
end
local n = tonumber(ARGV[3])
if ARGV[4] == 'give' then
  local k = KEYS[1] .. ':' .. ARGV[5]
  local cur = tonumber(redis.call('GET', k) or '0')
  if cur > 0 then redis.call('DECRBY', k, math.min(cur, n)) end
  return {0, 0, 0, 0, 0}
end
local key = KEYS[1] .. ':' .. string.format('%d', start)
local limit = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', key) or '0')
local avail = limit - used
if avail < 0 then avail = 0 end
local k = math.min(n, avail)
if k > 0 then
  redis.call('INCRBY', key, k)
  redis.call('EXPIREAT', key, stop + 3600)
end
return {k, avail - k, stop - now, start, used + k}
"#,
);

/// One quota lease.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    pub granted: u32,
    pub remaining: u64,
    pub reset: Duration,
    pub period_start: i64,
    pub used: u64,
}

pub async fn take(
    client: &Client,
    key: &str,
    limit: u64,
    period: Period,
    n: u32,
) -> Result<Taken, RedisError> {
    let (limit_s, n_s) = (limit.to_string(), n.to_string());
    let v = client
        .eval(
            &QUOTA,
            &[key.as_bytes()],
            &[
                period.as_str().as_bytes(),
                limit_s.as_bytes(),
                n_s.as_bytes(),
                b"take",
            ],
        )
        .await?;
    parse(&v)
}

fn parse(v: &Value) -> Result<Taken, RedisError> {
    let r = v.ints().ok_or(RedisError::Unexpected("quota script"))?;
    let [granted, remaining, reset, start, used] = r[..] else {
        return Err(RedisError::Unexpected("quota script"));
    };
    Ok(Taken {
        granted: u32::try_from(granted.max(0)).unwrap_or(0),
        remaining: remaining.max(0) as u64,
        reset: Duration::from_secs(reset.max(1) as u64),
        period_start: start,
        used: used.max(0) as u64,
    })
}

pub async fn give(client: &Client, key: &str, period_start: i64, n: u32) -> Result<(), RedisError> {
    let (start, n_s) = (period_start.to_string(), n.to_string());
    client
        .eval(
            &QUOTA,
            &[key.as_bytes()],
            &[b"day", b"0", n_s.as_bytes(), b"give", start.as_bytes()],
        )
        .await
        .map(|_| ())
}

/// Used so far in the current period, without taking anything (for `keys show`).
pub async fn used(client: &Client, key: &str, q: Quota) -> Result<Taken, RedisError> {
    let limit_s = q.limit.to_string();
    let v = client
        .eval(
            &QUOTA,
            &[key.as_bytes()],
            &[
                q.period.as_str().as_bytes(),
                limit_s.as_bytes(),
                b"0",
                b"take",
            ],
        )
        .await?;
    parse(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse_only_calendar_units() {
        assert_eq!(
            Quota::parse("100000/month").unwrap(),
            Quota {
                limit: 100_000,
                period: Period::Month
            }
        );
        assert_eq!(Quota::parse(" 5 / day ").unwrap().period, Period::Day);
        assert_eq!(Quota::parse("7/hour").unwrap().to_string(), "7/hour");
        for bad in [
            "", "5", "0/day", "5/m", "5/min", "5/d", "5/week", "5/s", "-1/day", "x/day",
        ] {
            assert!(Quota::parse(bad).is_err(), "{bad}");
        }
    }
}
