//! `[pipeline]`: batch size, commit lanes, retry backoff and the stall timeout.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub batch_max_records: usize,
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Batches committed concurrently, each over its own partitions (partition mod lanes),
    /// each with its own connection; 1 to 16.
    pub commit_lanes: usize,
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub lag_refresh_interval: Duration,
    /// An instance that owns partitions with lag and has committed nothing for this long is
    /// stalled: `/health/ready` fails and `payrecon_consumer_stalled` is 1.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}
