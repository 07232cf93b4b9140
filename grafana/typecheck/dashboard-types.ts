/**
 * The types every provisioned dashboard (grafana/dashboards/*.json) must satisfy.
 *
 * Built on @grafana/schema: the Dashboard/Panel/FieldConfig shapes and the option types of the
 * three panel plugins used (timeseries, stat, table). Two adaptations, both deliberate:
 *
 * 1. `Json<T>` turns @grafana/schema's TypeScript enums into the string literal unions JSON
 *    actually holds (`ThresholdsMode` becomes "absolute" | "percentage"). JSON cannot hold a
 *    TS enum value, and a cast would hide real errors; this keeps every value checked.
 * 2. Panel `options`, `fieldConfig.defaults.custom` and `targets` are typed per panel type.
 *    @grafana/schema's generic Panel leaves them as Record<string, unknown>; here a timeseries
 *    panel's options must be the timeseries plugin's Options, and so on. Query targets are
 *    NOT part of @grafana/schema: `PromTarget` and `SqlTarget` below are local types listing
 *    the fields of the Prometheus and PostgreSQL query editors these dashboards use.
 *
 * Datasources must be referenced by uid: "prometheus" or "payrecon-postgres" (see
 * grafana/provisioning/datasources/datasources.yml); any other reference is a type error.
 *
 * The JSON files are checked through generated/*.ts (written by generate.mjs), which hold
 * each dashboard as an object literal with `satisfies CheckedDashboard`: only a literal gets
 * TypeScript's excess-property check, so a misspelt field name fails the check instead of
 * being ignored (importing the .json module directly would not catch that).
 */
import type {
  DataQuery,
  Dashboard,
  FieldConfig,
  FieldConfigSource,
  GraphFieldConfig,
  Panel,
  RowPanel,
  TableFieldOptions,
  TableOptions,
  VariableModel,
} from '@grafana/schema';
import type { Options as StatOptions } from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type { Options as TimeSeriesOptions } from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/** The JSON form of a schema type: enums become the literal values they serialize to. */
export type Json<T> = unknown extends T
  ? T
  : T extends string
    ? `${T}`
    : T extends number | boolean | null | undefined
      ? T
      : T extends ReadonlyArray<infer U>
        ? Array<Json<U>>
        : T extends object
          ? { [K in keyof T]: Json<T[K]> }
          : T;

/** The two provisioned datasources, by uid. */
export type PrometheusRef = { type: 'prometheus'; uid: 'prometheus' };
export type PostgresRef = { type: 'grafana-postgresql-datasource'; uid: 'payrecon-postgres' };

type QueryBase = Omit<Json<DataQuery>, 'datasource'>;

/** A Prometheus query (local type: the Prometheus query model is not in @grafana/schema). */
export type PromTarget = QueryBase & {
  datasource: PrometheusRef;
  expr: string;
  legendFormat?: string;
  editorMode?: 'code' | 'builder';
  range?: boolean;
  instant?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
};

/** A PostgreSQL raw SQL query (local type, as above). */
export type SqlTarget = QueryBase & {
  datasource: PostgresRef;
  rawSql: string;
  rawQuery: true;
  editorMode: 'code';
  format: 'time_series' | 'table';
};

/** Either every query of a panel goes to Prometheus or every one to PostgreSQL. */
type Queries =
  | { datasource: PrometheusRef; targets: PromTarget[] }
  | { datasource: PostgresRef; targets: SqlTarget[] };

/** fieldConfig with `custom` typed by the panel plugin (omit C for plugins without one). */
type FieldConfigOf<C = never> = Omit<Json<FieldConfigSource>, 'defaults'> & {
  defaults: Omit<Json<FieldConfig>, 'custom'> & ([C] extends [never] ? {} : { custom?: Json<C> });
};

type PanelBase = Omit<Json<Panel>, 'type' | 'options' | 'fieldConfig' | 'targets' | 'datasource'> & {
  id: number;
  title: string;
  gridPos: Json<NonNullable<Panel['gridPos']>>;
};

export type TimeSeriesPanel = PanelBase &
  Queries & {
    type: 'timeseries';
    options: Json<TimeSeriesOptions>;
    fieldConfig: FieldConfigOf<GraphFieldConfig>;
  };

export type StatPanel = PanelBase &
  Queries & {
    type: 'stat';
    options: Json<StatOptions>;
    fieldConfig: FieldConfigOf;
  };

export type TablePanel = PanelBase &
  Queries & {
    type: 'table';
    options: Json<TableOptions>;
    fieldConfig: FieldConfigOf<TableFieldOptions>;
  };

/** Rows are used expanded: their panels follow them in the top-level list. */
export type CheckedRow = Omit<Json<RowPanel>, 'panels'> & { collapsed: false; panels: [] };

export type CheckedPanel = TimeSeriesPanel | StatPanel | TablePanel | CheckedRow;

export type CheckedVariable = Omit<Json<VariableModel>, 'datasource'> & {
  datasource?: PrometheusRef | PostgresRef;
};

export type CheckedDashboard = Omit<Json<Dashboard>, 'panels' | 'templating'> & {
  uid: string;
  title: string;
  panels: CheckedPanel[];
  templating: { list: CheckedVariable[] };
};
