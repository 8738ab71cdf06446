with

source as (
    {{ clean_rows(source('generator', 'default_labels'), 'default_labels') }}
),

renamed as (
    select
        cast(account_id as bigint) as account_id,
        cast(observation_date as date) as observation_date,
        cast(label_date as date) as label_date,
        cast(defaulted as bigint) as defaulted
    from source
)

select * from renamed
