"""sterling.sharding — document shards of a built artifact: whole IVF lists per shard, balanced by bytes."""
