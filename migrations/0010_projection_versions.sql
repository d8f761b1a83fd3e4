-- Issue 11, item 2: replay as blue/green versions. A replay (`vitals replay <processor> --as
-- <version>`) writes its own output topic and table (`proj_<name>__<version>`), progress under
-- `<name>@<version>`; the read API serves the promoted version of each projection (no row here:
-- the base version, v1), read in the same snapshot as the rows and their freshness, so a
-- promotion switches reads atomically.
CREATE TABLE projection_versions (
    projection  TEXT        PRIMARY KEY,
    promoted    TEXT        NOT NULL,
    previous    TEXT        NOT NULL,
    promoted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The base version was retired (`vitals retire <processor> v1`): the sink no longer applies
    -- it, and `vitals process <processor>` refuses to run it.
    base_retired BOOLEAN    NOT NULL DEFAULT false
);

-- Every version a replay started, with where it started: a replay restarted (after a crash, on
-- another machine) resumes from its checkpoints, and a task with none starts where the first
-- start resolved `--from` to (`start_offsets`: [{topic, partition, offset}]), never elsewhere.
CREATE TABLE projection_replays (
    projection    TEXT        NOT NULL,
    version       TEXT        NOT NULL,
    from_spec     TEXT        NOT NULL,
    start_offsets JSONB       NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, version)
);
