"""Beat-side parts of onelane: the reaper and the scheduler that runs it in-process."""
