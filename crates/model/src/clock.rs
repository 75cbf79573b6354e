//! The one time source (requirement R4).
//!
//! Every timestamp Haven writes (`meta.lastUpdated`, `AuditEvent.recorded`,
//! `Provenance.recorded`, token times) comes from a [`Clock`] passed in explicitly,
//! so tests can pin time and nothing reads the system time on its own.

use std::sync::Mutex;
use time::OffsetDateTime;

/// A source of the current instant, always in UTC and truncated to microseconds
/// (the precision both storage backends keep).
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> OffsetDateTime;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        truncate_to_micros(OffsetDateTime::now_utc())
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Mutex::new(truncate_to_micros(start)),
        }
    }

    pub fn advance(&self, by: time::Duration) {
        let mut now = self.now.lock().expect("clock lock poisoned");
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().expect("clock lock poisoned")
    }
}

fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let micros = t.microsecond();
    t.replace_microsecond(micros).unwrap_or(t)
}

/// Formats an instant as a FHIR `instant` in UTC with microseconds,
/// e.g. `2026-11-22T05:34:29.123456Z`. Fixed width, so text order is time order.
pub fn format_instant(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn instants_are_formatted_in_utc_with_microseconds() {
        let t = datetime!(2026-11-22 07:34:29.123456789 +02:00);
        assert_eq!(format_instant(t), "2026-11-22T05:34:29.123456Z");
    }

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(datetime!(2026-01-01 00:00 UTC));
        let first = clock.now();
        assert_eq!(clock.now(), first);
        clock.advance(time::Duration::seconds(5));
        assert_eq!(clock.now() - first, time::Duration::seconds(5));
    }
}
