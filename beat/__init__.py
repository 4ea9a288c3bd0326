"""Beat entry points: the scheduler that runs onelane's reaper inside beat."""
