"""Running a plan: the pass loop (`job`), one pass supervised (`supervise`), dead workers noticed (`watch`)."""
