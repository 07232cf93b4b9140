//! The readiness probe's question to PostgreSQL: does it answer a trivial query now?

use super::Store;

impl Store {
    /// Runs `SELECT 1` on a pooled connection.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(self.pool())
            .await
            .map(|_| ())
    }
}
