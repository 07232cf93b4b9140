#!/bin/bash
# Run once by the postgres image on an empty data directory (mounted into
# /docker-entrypoint-initdb.d by docker-compose.yml): creates the read-only role Grafana's
# "payrecon PostgreSQL" datasource logs in with. The password comes from the environment
# (GRAFANA_DB_PASSWORD), never from this file.
#
# Tables do not exist yet (payrecon's migrations create them at start-up as $POSTGRES_USER),
# so SELECT is granted through default privileges on what that role creates later.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v reader_password="$GRAFANA_DB_PASSWORD" \
  -v owner="$POSTGRES_USER" \
  -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_password';
GRANT CONNECT ON DATABASE :"db" TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
-- "TABLES" includes views: the reporting views of migrations/20261126000004_reporting_views.sql
-- (open_exceptions, reconciliation_status_summary, merchant_daily_report, exception_activity)
-- are readable as soon as payrecon's migrations create them. A view reads its tables with its
-- owner's rights, so this role needs nothing more for them.
-- Dashboards must never hold a query open for long on the service's database.
ALTER ROLE grafana_reader SET statement_timeout = '30s';
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
SQL
