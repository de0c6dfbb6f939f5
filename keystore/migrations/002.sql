-- Version 1 -> 2: the full key lifecycle.  Version 1 held only what
-- authentication, account types and model access needed.
ALTER TABLE keys ADD COLUMN user_id TEXT;
ALTER TABLE keys ADD COLUMN team_id TEXT;
ALTER TABLE keys ADD COLUMN aliases TEXT NOT NULL DEFAULT '{}';
ALTER TABLE keys ADD COLUMN enforced_params TEXT NOT NULL DEFAULT '[]';
ALTER TABLE keys ADD COLUMN rpm_limit INTEGER;
ALTER TABLE keys ADD COLUMN tpm_limit INTEGER;
ALTER TABLE keys ADD COLUMN max_parallel_requests INTEGER;
ALTER TABLE keys ADD COLUMN max_budget REAL;
ALTER TABLE keys ADD COLUMN budget_duration TEXT;
ALTER TABLE keys ADD COLUMN budget_reset_at TEXT;
ALTER TABLE keys ADD COLUMN spend REAL NOT NULL DEFAULT 0;
-- ADD COLUMN cannot take a non-constant default, so old rows start from
-- their creation time.
ALTER TABLE keys ADD COLUMN updated_at TEXT NOT NULL DEFAULT '';
UPDATE keys SET updated_at = created_at;
-- UNIQUE cannot be added by ALTER TABLE; a unique index does the same job.
ALTER TABLE keys ADD COLUMN grace_token TEXT;
ALTER TABLE keys ADD COLUMN grace_until TEXT;
CREATE UNIQUE INDEX keys_grace_token ON keys (grace_token);
CREATE INDEX keys_account_type ON keys (account_type);
CREATE INDEX keys_user_id ON keys (user_id);
CREATE INDEX keys_team_id ON keys (team_id);
PRAGMA user_version = 2;
