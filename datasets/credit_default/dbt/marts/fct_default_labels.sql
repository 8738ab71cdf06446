-- Default outcomes with their event time (end of the observation day: the as-of time of the
-- features) and their arrival time, plus the protected attributes for fairness reports.
{{
    config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key='label_date',
        tags=['daily'],
    )
}}

with

labels as (
    select * from {{ ref('stg_generator__default_labels') }}
    where {{ in_partition_window('label_date') }}
),

accounts as (
    select * from {{ ref('dim_accounts') }}
),

final as (
    select
        labels.account_id,
        labels.observation_date,
        labels.label_date,
        cast(labels.observation_date + interval 1 day as timestamptz) as event_timestamp,
        cast(labels.label_date + interval 1 day as timestamptz) as label_timestamp,
        labels.defaulted,
        accounts.age_band,
        accounts.sex,
        accounts.region
    from labels
    left join accounts on labels.account_id = accounts.account_id
)

select * from final
