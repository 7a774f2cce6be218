"""A simulated All-of-Us-like cohort whose true risks are known: `ehr-prs simulate`.

Every subject gets latent parameters (baseline levels and yearly slopes of BMI, HbA1c,
systolic BP, LDL, eGFR; smoking; onset times of comorbidities; a death time; genetic
liabilities that a handful of PRS columns carry). The hazard of each task disease
(T2D, stroke, COPD) is a deterministic function of time given those parameters, constant
on 30-day cells, so the probability of onset within a horizon is an exact integral:
1 - exp(-e^{genetic term} * (L(t + H) - L(t))). The record (MEDS events) shows noisy
readouts of the latent state at visits; nothing written before a disease's onset depends
on the random draw that decides that onset, so `truth/` is the best any model can do.

Layout under --out (a contract other stages code against):
    meds/data/{train,tuning,held_out}/{0,1,...}.parquet   MEDS 0.4 events
    meds/metadata/{codes.parquet,subject_splits.parquet,dataset.json}
    prs.parquet        subject_id, ancestry, PGS000001... (genotyped subjects only)
    labels/{t2d,stroke,copd}.parquet                     MEDS label schema
    truth/{t2d,stroke,copd}.parquet, truth/prs_traits.json, truth/subjects.parquet
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ehr_prs.errors import InputError, atomic_output_dir, check_output

# pyarrow and meds are imported where the files are written: `ehr-prs simulate --help` needs neither.
if TYPE_CHECKING:
    import pyarrow as pa

# ----------------------------------------------------------------------------- vocabulary
TASKS = ("t2d", "stroke", "copd")
TASK_CODE_PREFIXES = {"t2d": "ICD10CM/E11", "stroke": "ICD10CM/I63", "copd": "ICD10CM/J44"}
VISIT_START_CODES = {"OP": "Visit/OP", "IP": "Visit/IP", "ER": "Visit/ER"}
VISIT_END_CODE = "Visit/END"
BIRTH_CODE = "MEDS_BIRTH"  # meds.birth_code (tests/test_layout.py checks they agree)
DEATH_CODE = "MEDS_DEATH"  # meds.death_code
ANCESTRIES = ("afr", "amr", "eas", "eur", "mid", "sas")
ANCESTRY_P = np.array([0.22, 0.18, 0.03, 0.53, 0.015, 0.025])  # roughly All of Us v7
SPLITS = ("train", "tuning", "held_out")
GENOTYPED_FRACTION = 0.6
# truth/subjects.parquet and metadata/subject_splits.parquet are written sorted by subject in row
# groups of this many subjects, merged from per-shard parts, so memory stays flat in cohort size
# (a cohort up to this size gets one row group, as one `pq.write_table` of the whole table would).
SUBJECT_ROW_GROUP = 1 << 16
MEASUREMENT_CODES = {
    "bmi": "LOINC/39156-5", "hba1c": "LOINC/4548-4", "glucose": "LOINC/2345-7",
    "sbp": "LOINC/8480-6", "dbp": "LOINC/8462-4", "ldl": "LOINC/13457-7",
    "egfr": "LOINC/33914-3", "creatinine": "LOINC/2160-0", "weight": "LOINC/29463-7",
    "heart_rate": "LOINC/8867-4", "pack_years": "SNOMED/401201003",
}
SMOKING_CODES = {"never": "SNOMED/266919005", "former": "SNOMED/8517006", "current": "SNOMED/77176002"}

# "code|description" tables; parsed once at import. Real code strings from ICD-10-CM,
# RxNorm (ingredient RxCUIs), LOINC, CPT-4 and SNOMED CT.
_FIXED_CODES = """\
Visit/OP|Outpatient visit
Visit/IP|Inpatient visit
Visit/ER|Emergency room visit
Visit/END|End of visit
MEDS_BIRTH|Birth
MEDS_DEATH|Death
Gender/F|Female
Gender/M|Male
Race/White|White
Race/Black or African American|Black or African American
Race/Asian|Asian
Race/Middle Eastern or North African|Middle Eastern or North African
Race/More than one population|More than one population
Race/None of these|None of these
Ethnicity/Hispanic or Latino|Hispanic or Latino
Ethnicity/Not Hispanic or Latino|Not Hispanic or Latino
ICD10CM/E11.9|Type 2 diabetes mellitus without complications
ICD10CM/E11.65|Type 2 diabetes mellitus with hyperglycemia
ICD10CM/E11.22|Type 2 diabetes mellitus with diabetic chronic kidney disease
ICD10CM/E11.40|Type 2 diabetes mellitus with diabetic neuropathy, unspecified
ICD10CM/I63.9|Cerebral infarction, unspecified
ICD10CM/I63.50|Cerebral infarction due to unspecified occlusion or stenosis of unspecified cerebral artery
ICD10CM/I63.40|Cerebral infarction due to embolism of unspecified cerebral artery
ICD10CM/I63.81|Other cerebral infarction due to occlusion or stenosis of small artery
ICD10CM/J44.9|Chronic obstructive pulmonary disease, unspecified
ICD10CM/J44.1|Chronic obstructive pulmonary disease with (acute) exacerbation
ICD10CM/J44.0|Chronic obstructive pulmonary disease with (acute) lower respiratory infection
ICD10CM/I10|Essential (primary) hypertension
ICD10CM/I48.91|Unspecified atrial fibrillation
ICD10CM/I48.0|Paroxysmal atrial fibrillation
ICD10CM/I48.20|Chronic atrial fibrillation, unspecified
ICD10CM/E66.9|Obesity, unspecified
ICD10CM/E66.01|Morbid (severe) obesity due to excess calories
ICD10CM/E78.5|Hyperlipidemia, unspecified
ICD10CM/E78.00|Pure hypercholesterolemia, unspecified
ICD10CM/N18.30|Chronic kidney disease, stage 3 unspecified
ICD10CM/N18.9|Chronic kidney disease, unspecified
ICD10CM/I25.10|Atherosclerotic heart disease of native coronary artery without angina pectoris
ICD10CM/F32.9|Major depressive disorder, single episode, unspecified
ICD10CM/F32.A|Depression, unspecified
ICD10CM/R73.03|Prediabetes
ICD10CM/G45.9|Transient cerebral ischemic attack, unspecified
ICD10CM/R06.02|Shortness of breath
ICD10CM/R05.9|Cough, unspecified
ICD10CM/J20.9|Acute bronchitis, unspecified
ICD10CM/F17.210|Nicotine dependence, cigarettes, uncomplicated
ICD10CM/Z87.891|Personal history of nicotine dependence
ICD10CM/Z86.73|Personal history of transient ischemic attack (TIA), and cerebral infarction without residual deficits
SNOMED/266919005|Never smoked tobacco
SNOMED/8517006|Ex-smoker
SNOMED/77176002|Smoker
SNOMED/401201003|Cigarette pack-years
LOINC/39156-5|Body mass index (BMI) [Ratio]
LOINC/4548-4|Hemoglobin A1c/Hemoglobin.total in Blood
LOINC/2345-7|Glucose [Mass/volume] in Serum or Plasma
LOINC/8480-6|Systolic blood pressure
LOINC/8462-4|Diastolic blood pressure
LOINC/13457-7|Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation
LOINC/33914-3|Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma by Creatinine-based formula (MDRD)
LOINC/2160-0|Creatinine [Mass/volume] in Serum or Plasma
LOINC/29463-7|Body weight
LOINC/8867-4|Heart rate
RxNorm/6809|metformin
RxNorm/4821|glipizide
RxNorm/593411|sitagliptin
RxNorm/1545653|empagliflozin
RxNorm/274783|insulin glargine
RxNorm/1991302|semaglutide
RxNorm/435|albuterol
RxNorm/69120|tiotropium
RxNorm/19831|budesonide
RxNorm/36117|salmeterol
RxNorm/7213|ipratropium
RxNorm/1191|aspirin
RxNorm/32968|clopidogrel
RxNorm/83367|atorvastatin
RxNorm/1364430|apixaban
RxNorm/11289|warfarin
RxNorm/1114195|rivaroxaban
RxNorm/6918|metoprolol
RxNorm/3443|diltiazem
RxNorm/29046|lisinopril
RxNorm/17767|amlodipine
RxNorm/52175|losartan
RxNorm/5487|hydrochlorothiazide
RxNorm/36567|simvastatin
RxNorm/301542|rosuvastatin
RxNorm/341248|ezetimibe
RxNorm/4917|nitroglycerin
RxNorm/36437|sertraline
RxNorm/321988|escitalopram
RxNorm/42347|bupropion
RxNorm/4603|furosemide
RxNorm/8152|phentermine
RxNorm/7407|nicotine
RxNorm/591622|varenicline
CPT4/99213|Office or other outpatient visit, established patient, low complexity
CPT4/99214|Office or other outpatient visit, established patient, moderate complexity
CPT4/99215|Office or other outpatient visit, established patient, high complexity
CPT4/99396|Periodic comprehensive preventive medicine, established patient, 40-64 years
CPT4/99397|Periodic comprehensive preventive medicine, established patient, 65 years and older
CPT4/99283|Emergency department visit, moderate severity
CPT4/99284|Emergency department visit, high severity
CPT4/99285|Emergency department visit, high severity with significant threat
CPT4/99223|Initial hospital inpatient care, high complexity
CPT4/83036|Hemoglobin; glycosylated (A1C)
CPT4/92250|Fundus photography with interpretation and report
CPT4/94010|Spirometry
CPT4/71046|Radiologic examination, chest; 2 views
CPT4/70450|Computed tomography, head or brain; without contrast material
CPT4/70551|Magnetic resonance imaging, brain; without contrast material
CPT4/93880|Duplex scan of extracranial arteries; complete bilateral study
CPT4/93000|Electrocardiogram, routine ECG with at least 12 leads; with interpretation and report
CPT4/93306|Echocardiography, transthoracic, complete, with spectral and color flow Doppler
CPT4/93015|Cardiovascular stress test
CPT4/80061|Lipid panel
CPT4/80048|Basic metabolic panel
"""

_BACKGROUND_DX = """\
J06.9|Acute upper respiratory infection, unspecified
Z00.00|Encounter for general adult medical examination without abnormal findings
Z00.01|Encounter for general adult medical examination with abnormal findings
Z23|Encounter for immunization
M54.50|Low back pain, unspecified
R51.9|Headache, unspecified
K21.9|Gastro-esophageal reflux disease without esophagitis
E03.9|Hypothyroidism, unspecified
F41.9|Anxiety disorder, unspecified
F41.1|Generalized anxiety disorder
G47.33|Obstructive sleep apnea (adult) (pediatric)
M17.9|Osteoarthritis of knee, unspecified
M25.561|Pain in right knee
M25.562|Pain in left knee
M79.10|Myalgia, unspecified site
R10.9|Unspecified abdominal pain
R07.9|Chest pain, unspecified
R42|Dizziness and giddiness
R53.83|Other fatigue
N39.0|Urinary tract infection, site not specified
J02.9|Acute pharyngitis, unspecified
J01.90|Acute sinusitis, unspecified
H10.9|Unspecified conjunctivitis
L30.9|Dermatitis, unspecified
B35.1|Tinea unguium
E55.9|Vitamin D deficiency, unspecified
D64.9|Anemia, unspecified
E87.1|Hypo-osmolality and hyponatremia
K59.00|Constipation, unspecified
K57.30|Diverticulosis of large intestine without perforation or abscess without bleeding
K64.9|Unspecified hemorrhoids
N40.0|Benign prostatic hyperplasia without lower urinary tract symptoms
N95.1|Menopausal and female climacteric states
Z12.31|Encounter for screening mammogram for malignant neoplasm of breast
Z12.11|Encounter for screening for malignant neoplasm of colon
Z13.220|Encounter for screening for lipoid disorders
Z79.899|Other long term (current) drug therapy
Z90.49|Acquired absence of other specified parts of digestive tract
Z96.651|Presence of right artificial knee joint
H52.4|Presbyopia
H25.9|Unspecified age-related cataract
H40.9|Unspecified glaucoma
H61.23|Impacted cerumen, bilateral
J30.9|Allergic rhinitis, unspecified
J45.909|Unspecified asthma, uncomplicated
J18.9|Pneumonia, unspecified organism
I50.9|Heart failure, unspecified
I73.9|Peripheral vascular disease, unspecified
I83.90|Asymptomatic varicose veins of unspecified lower extremity
I95.9|Hypotension, unspecified
R00.2|Palpitations
R06.00|Dyspnea, unspecified
R11.0|Nausea
R19.7|Diarrhea, unspecified
R20.2|Paresthesia of skin
R21|Rash and other nonspecific skin eruption
R31.9|Hematuria, unspecified
R35.0|Frequency of micturition
R39.15|Urgency of urination
R41.82|Altered mental status, unspecified
R50.9|Fever, unspecified
R55|Syncope and collapse
R60.0|Localized edema
R63.4|Abnormal weight loss
R63.5|Abnormal weight gain
R79.89|Other specified abnormal findings of blood chemistry
R94.31|Abnormal electrocardiogram [ECG] [EKG]
S39.012A|Strain of muscle, fascia and tendon of lower back, initial encounter
S93.401A|Sprain of unspecified ligament of right ankle, initial encounter
S06.0X0A|Concussion without loss of consciousness, initial encounter
T78.40XA|Allergy, unspecified, initial encounter
W19.XXXA|Unspecified fall, initial encounter
M19.90|Unspecified osteoarthritis, unspecified site
M10.9|Gout, unspecified
M81.0|Age-related osteoporosis without current pathological fracture
M54.2|Cervicalgia
M54.16|Radiculopathy, lumbar region
M75.101|Unspecified rotator cuff tear or rupture of right shoulder, not specified as traumatic
M72.2|Plantar fascial fibromatosis
G43.909|Migraine, unspecified, not intractable, without status migrainosus
G56.00|Carpal tunnel syndrome, unspecified upper limb
G62.9|Polyneuropathy, unspecified
G89.29|Other chronic pain
G47.00|Insomnia, unspecified
G30.9|Alzheimer's disease, unspecified
F03.90|Unspecified dementia without behavioral disturbance
F10.20|Alcohol dependence, uncomplicated
F33.1|Major depressive disorder, recurrent, moderate
F43.10|Post-traumatic stress disorder, unspecified
K29.70|Gastritis, unspecified, without bleeding
K76.0|Fatty (change of) liver, not elsewhere classified
K80.20|Calculus of gallbladder without cholecystitis without obstruction
K58.9|Irritable bowel syndrome without diarrhea
K44.9|Diaphragmatic hernia without obstruction or gangrene
L40.0|Psoriasis vulgaris
L57.0|Actinic keratosis
L72.0|Epidermal cyst
L82.1|Other seborrheic keratosis
D22.9|Melanocytic nevi, unspecified
C61|Malignant neoplasm of prostate
C50.911|Malignant neoplasm of unspecified site of right female breast
C18.9|Malignant neoplasm of colon, unspecified
D72.829|Elevated white blood cell count, unspecified
D69.6|Thrombocytopenia, unspecified
E04.1|Nontoxic single thyroid nodule
E05.90|Thyrotoxicosis, unspecified without thyrotoxic crisis or storm
E83.42|Hypomagnesemia
E87.6|Hypokalemia
E86.0|Dehydration
N17.9|Acute kidney failure, unspecified
N20.0|Calculus of kidney
N32.81|Overactive bladder
N76.0|Acute vaginitis
N92.0|Excessive and frequent menstruation with regular cycle
B34.9|Viral infection, unspecified
U07.1|COVID-19
A09|Infectious gastroenteritis and colitis, unspecified
A41.9|Sepsis, unspecified organism
Z11.59|Encounter for screening for other viral diseases
Z20.822|Contact with and (suspected) exposure to COVID-19
Z01.419|Encounter for gynecological examination (general) (routine) without abnormal findings
Z01.818|Encounter for other preprocedural examination
Z71.3|Dietary counseling and surveillance
Z76.0|Encounter for issue of repeat prescription
Z91.81|History of falling
I35.0|Nonrheumatic aortic (valve) stenosis
I34.0|Nonrheumatic mitral (valve) insufficiency
I26.99|Other pulmonary embolism without acute cor pulmonale
I87.2|Venous insufficiency (chronic) (peripheral)
I49.9|Cardiac arrhythmia, unspecified
I47.1|Supraventricular tachycardia
J98.4|Other disorders of lung
J32.9|Chronic sinusitis, unspecified
J31.0|Chronic rhinitis
R09.02|Hypoxemia
R91.1|Solitary pulmonary nodule
"""

_BACKGROUND_RX = """\
723|amoxicillin
18631|azithromycin
2231|cephalexin
2551|ciprofloxacin
3640|doxycycline
7454|nitrofurantoin
10180|sulfamethoxazole
8640|prednisone
6902|methylprednisolone
5640|ibuprofen
7258|naproxen
161|acetaminophen
10689|tramadol
7804|oxycodone
5489|hydrocodone
25480|gabapentin
21949|cyclobenzaprine
7646|omeprazole
40790|pantoprazole
4278|famotidine
26225|ondansetron
28889|loratadine
20610|cetirizine
41126|fluticasone
88249|montelukast
10582|levothyroxine
4493|fluoxetine
2556|citalopram
10737|trazodone
596|alprazolam
6470|lorazepam
39993|zolpidem
20352|carvedilol
9997|spironolactone
8591|potassium chloride
42463|pravastatin
77492|tamsulosin
25025|finasteride
136411|sildenafil
4083|estradiol
6691|medroxyprogesterone
2418|cholecalciferol
4511|folic acid
24947|ferrous sulfate
11248|cyanocobalamin
519|allopurinol
2683|colchicine
46041|alendronate
41493|meloxicam
73645|valacyclovir
4450|fluconazole
"""

_BACKGROUND_CPT = """\
36415|Collection of venous blood by venipuncture
85025|Blood count; complete (CBC), automated, with automated differential WBC count
80053|Comprehensive metabolic panel
84443|Thyroid stimulating hormone (TSH)
81001|Urinalysis, automated, with microscopy
90471|Immunization administration
90686|Influenza virus vaccine, quadrivalent, split virus, preservative free, intramuscular
96372|Therapeutic, prophylactic, or diagnostic injection; subcutaneous or intramuscular
97110|Therapeutic procedure, therapeutic exercises
97140|Manual therapy techniques
20610|Arthrocentesis, aspiration and/or injection, major joint or bursa
11102|Tangential biopsy of skin, single lesion
17110|Destruction of benign lesions other than skin tags; up to 14 lesions
92014|Ophthalmological services, comprehensive, established patient
93970|Duplex scan of extremity veins; complete bilateral study
76700|Ultrasound, abdominal, real time with image documentation; complete
73562|Radiologic examination, knee; 3 views
72100|Radiologic examination, spine, lumbosacral; 2 or 3 views
71250|Computed tomography, thorax; without contrast material
74177|Computed tomography, abdomen and pelvis; with contrast material
77067|Screening mammography, bilateral
45378|Colonoscopy, flexible; diagnostic
45380|Colonoscopy, flexible; with biopsy, single or multiple
95810|Polysomnography; age 6 years or older, sleep staging with 4 or more additional parameters
99203|Office or other outpatient visit, new patient, low complexity
99204|Office or other outpatient visit, new patient, moderate complexity
"""

# Background labs: LOINC code, description, mean, sd (values drawn around the mean).
_BACKGROUND_LABS = """\
718-7|Hemoglobin [Mass/volume] in Blood|13.6|1.5
6690-2|Leukocytes [#/volume] in Blood by Automated count|7.1|2.0
777-3|Platelets [#/volume] in Blood by Automated count|250|60
2951-2|Sodium [Moles/volume] in Serum or Plasma|139|2.5
2823-3|Potassium [Moles/volume] in Serum or Plasma|4.2|0.4
2075-0|Chloride [Moles/volume] in Serum or Plasma|103|3
2028-9|Carbon dioxide, total [Moles/volume] in Serum or Plasma|25|2.5
3094-0|Urea nitrogen [Mass/volume] in Serum or Plasma|15|5
17861-6|Calcium [Mass/volume] in Serum or Plasma|9.4|0.4
1742-6|Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma|25|12
1920-8|Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma|24|9
1751-7|Albumin [Mass/volume] in Serum or Plasma|4.2|0.35
3016-3|Thyrotropin [Units/volume] in Serum or Plasma|2.0|1.2
2085-9|Cholesterol in HDL [Mass/volume] in Serum or Plasma|52|14
2571-8|Triglyceride [Mass/volume] in Serum or Plasma|140|60
8310-5|Body temperature|36.8|0.3
9279-1|Respiratory rate|16|2
59408-5|Oxygen saturation in Arterial blood by Pulse oximetry|97|1.5
"""


def _parse(table: str, prefix: str = "") -> list[list[str]]:
    return [[prefix + f[0], *f[1:]] for f in (line.split("|") for line in table.strip().splitlines())]


_fixed = _parse(_FIXED_CODES)
_bg_dx = _parse(_BACKGROUND_DX, "ICD10CM/")
_bg_rx = _parse(_BACKGROUND_RX, "RxNorm/")
_bg_cpt = _parse(_BACKGROUND_CPT, "CPT4/")
_bg_lab = _parse(_BACKGROUND_LABS, "LOINC/")
CODEBOOK: list[tuple[str, str]] = [(r[0], r[1]) for r in _fixed + _bg_dx + _bg_rx + _bg_cpt + _bg_lab]
_CODE_STRINGS = np.array([c for c, _ in CODEBOOK], dtype=object)
_CI = {c: i for i, (c, _) in enumerate(CODEBOOK)}
assert len(_CI) == len(CODEBOOK), "duplicate code in the simulator's codebook"
_BG_DX_IDX = np.array([_CI[r[0]] for r in _bg_dx])
_BG_RX_IDX = np.array([_CI[r[0]] for r in _bg_rx])
_BG_CPT_IDX = np.array([_CI[r[0]] for r in _bg_cpt])
_BG_LAB_IDX = np.array([_CI[r[0]] for r in _bg_lab])
_BG_LAB_MEAN = np.array([float(r[2]) for r in _bg_lab])
_BG_LAB_SD = np.array([float(r[3]) for r in _bg_lab])


def _ci(codes: list[str]) -> np.ndarray:
    return np.array([_CI[c] for c in codes])


# Conditions other than the tasks; onset times are latent parameters (threshold crossings
# of latent trajectories or Gompertz draws). name -> (codes, per-visit recording probability,
# drugs, per-visit prescription probability).
COMORBIDITIES = {
    "htn": (["ICD10CM/I10"], 0.6, ["RxNorm/29046", "RxNorm/17767", "RxNorm/52175", "RxNorm/5487"], 0.5),
    "obesity": (["ICD10CM/E66.9", "ICD10CM/E66.01"], 0.35, ["RxNorm/8152"], 0.05),
    "hld": (["ICD10CM/E78.5", "ICD10CM/E78.00"], 0.45, ["RxNorm/83367", "RxNorm/36567", "RxNorm/301542", "RxNorm/341248"], 0.45),
    "ckd": (["ICD10CM/N18.30", "ICD10CM/N18.9"], 0.5, ["RxNorm/4603", "RxNorm/52175"], 0.3),
    "af": (["ICD10CM/I48.91", "ICD10CM/I48.0", "ICD10CM/I48.20"], 0.6, ["RxNorm/1364430", "RxNorm/11289", "RxNorm/1114195", "RxNorm/6918", "RxNorm/3443"], 0.55),
    "cad": (["ICD10CM/I25.10"], 0.55, ["RxNorm/1191", "RxNorm/4917", "RxNorm/6918", "RxNorm/83367"], 0.5),
    "depression": (["ICD10CM/F32.9", "ICD10CM/F32.A"], 0.45, ["RxNorm/36437", "RxNorm/321988", "RxNorm/42347"], 0.45),
}
TASK_CONDITIONS = {
    "t2d": (["ICD10CM/E11.9", "ICD10CM/E11.65", "ICD10CM/E11.22", "ICD10CM/E11.40"], 0.65,
            ["RxNorm/6809", "RxNorm/6809", "RxNorm/4821", "RxNorm/593411", "RxNorm/1545653", "RxNorm/274783", "RxNorm/1991302"], 0.6),
    "stroke": (["ICD10CM/I63.9", "ICD10CM/I63.50", "ICD10CM/I63.40", "ICD10CM/I63.81"], 0.25,
               ["RxNorm/1191", "RxNorm/32968", "RxNorm/83367"], 0.5),
    "copd": (["ICD10CM/J44.9", "ICD10CM/J44.1", "ICD10CM/J44.0"], 0.6,
             ["RxNorm/435", "RxNorm/69120", "RxNorm/19831", "RxNorm/36117", "RxNorm/7213"], 0.55),
}
# Procedures done at the visit where a task disease is diagnosed.
ONSET_PROCEDURES = {"t2d": ["CPT4/83036"], "stroke": ["CPT4/70450", "CPT4/70551", "CPT4/93880"], "copd": ["CPT4/94010", "CPT4/71046"]}

# Genetic traits: each gets a block of PRS columns, of which CARRIERS_PER_TRAIT carry it.
GENETIC_TRAITS = ("t2d", "stroke", "copd", "bmi", "sbp", "ldl", "af", "cad")
TRAIT_BLOCK_SIZE = 6
CARRIERS_PER_TRAIT = 3
# Effect of the PRS-carried liability relative to European ancestry (imperfect portability).
PORTABILITY = {"afr": 0.5, "amr": 0.8, "eas": 0.7, "eur": 1.0, "mid": 0.85, "sas": 0.75}
# log-hazard per SD of the genetic liability, for the task diseases.
GENETIC_LOG_HR = {"t2d": 0.9, "stroke": 0.6, "copd": 0.6}

# ----------------------------------------------------------------------------- time grid
DAY_US = 86_400_000_000
YEAR = 365.25
_ADMIN_END = 19723.0  # 2024-01-01 in days since 1970-01-01: end of the extract
_START_MIN, _START_MAX = 15340.0, 18262.0  # record start between 2012-01-01 and 2020-01-01
_CELL = 30.4375  # hazard is constant on 30.4-day cells
_N_CELLS = int(math.ceil((_ADMIN_END - _START_MIN) / _CELL)) + 1
_N_PRE = 6  # cells covering age 18 .. record start (prevalent disease)
MIN_HISTORY_DAYS = 180  # a prediction time has at least this much record before it


@dataclass
class _PrsDesign:
    """Which PRS columns form which correlated block, and how raw scores are scaled by ancestry."""

    col_block: np.ndarray  # (n_prs,) block id of each column
    n_blocks: int
    sqrt_lam: np.ndarray  # (n_prs,) loading on the block factor
    mean: np.ndarray  # (6, n_prs) raw mean by ancestry
    scale: np.ndarray  # (6, n_prs) raw scale by ancestry
    carriers: dict[str, np.ndarray]  # trait -> carrier column indices
    carrier_norm: dict[str, float]  # sd of the carriers' sum
    portability: dict[str, dict[str, float]]  # trait -> ancestry -> effect multiplier


def _prs_design(seed: int, n_prs: int) -> _PrsDesign:
    """Lay out PRS columns into blocks: one block per genetic trait plus background blocks."""
    need = len(GENETIC_TRAITS) * TRAIT_BLOCK_SIZE
    if n_prs < need:
        raise InputError(f"--n-prs {n_prs} is too small: the simulator needs at least {need} PRS columns")
    rng = np.random.default_rng([seed, 7_000_001])
    perm = rng.permutation(n_prs)
    col_block = np.empty(n_prs, dtype=np.int64)
    carriers = {}
    for t, trait in enumerate(GENETIC_TRAITS):
        cols = perm[t * TRAIT_BLOCK_SIZE:(t + 1) * TRAIT_BLOCK_SIZE]
        col_block[cols] = t
        carriers[trait] = np.sort(cols[:CARRIERS_PER_TRAIT])
    rest, b = perm[need:], len(GENETIC_TRAITS)
    while len(rest):
        size = int(rng.integers(3, 40))
        col_block[rest[:size]] = b
        rest, b = rest[size:], b + 1
    lam = rng.uniform(0.25, 0.75, n_prs)
    base_scale = 10.0 ** rng.uniform(-3, 1, n_prs)
    base_mean = rng.normal(0, 3, n_prs) * base_scale
    mean = base_mean + base_scale * rng.normal(0, 0.8, (len(ANCESTRIES), n_prs))
    scale = base_scale * np.exp(rng.normal(0, 0.25, (len(ANCESTRIES), n_prs)))
    norm = {}
    for trait, cols in carriers.items():
        s = np.sqrt(lam[cols])
        norm[trait] = float(np.sqrt(len(cols) + s.sum() ** 2 - (s**2).sum()))
    port = {trait: {a: round(PORTABILITY[a] * float(np.exp(rng.normal(0, 0.08))) if a != "eur" else 1.0, 3)
                    for a in ANCESTRIES} for trait in GENETIC_TRAITS}
    return _PrsDesign(col_block, b, np.sqrt(lam).astype(np.float32), mean, scale, carriers, norm, port)


# ----------------------------------------------------------------------------- latent model
def _gompertz_onset(rng, start_age, alpha, beta):
    """Age at onset under hazard exp(alpha + beta*(age-50)) per year, from start_age (inverse CDF)."""
    e = rng.exponential(1.0, len(start_age))
    return 50 + np.log(np.exp(beta * (start_age - 50)) + beta * e * np.exp(-alpha)) / beta


def _crossing(level0, slope, threshold, t0, above=True):
    """Time (days) when a linear trajectory level0 + slope*years first passes threshold; -inf if already."""
    gap = (threshold - level0) if above else (level0 - threshold)
    rate = slope if above else -slope
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(gap <= 0, -np.inf, np.where(rate > 0, t0 + gap / rate * YEAR, np.inf))
    return t


def _latent_subjects(rng: np.random.Generator, n: int, design: _PrsDesign, g: dict[str, np.ndarray], anc: np.ndarray) -> dict:
    """Draw every latent parameter of n subjects (except the task-onset draws)."""
    S: dict[str, np.ndarray] = {"anc": anc}
    m = {t: np.array([design.portability[t][a] for a in ANCESTRIES])[anc] for t in GENETIC_TRAITS}
    S["female"] = rng.random(n) < 0.6
    S["t0"] = np.floor(rng.uniform(_START_MIN, _START_MAX, n))
    S["age0"] = 18 + 67 * rng.beta(2.0, 2.2, n)
    S["birth"] = np.floor(S["t0"] - S["age0"] * YEAR)
    S["age0"] = (S["t0"] - S["birth"]) / YEAR
    afr, eas_sas = anc == 0, (anc == 2) | (anc == 5)
    fem = S["female"].astype(float)
    S["height"] = np.where(S["female"], rng.normal(1.62, 0.065, n), rng.normal(1.76, 0.07, n))
    S["bmi0"] = 28.5 + 1.5 * afr - 3.0 * eas_sas + 1.8 * m["bmi"] * g["bmi"] + rng.normal(0, 4.5, n)
    S["bmi1"] = rng.normal(0.12, 0.35, n)
    S["a1c0"] = 5.25 + 0.04 * (S["bmi0"] - 28) + 0.008 * (S["age0"] - 50) + 0.15 * afr + rng.normal(0, 0.35, n)
    S["a1c1"] = 0.02 + 0.05 * S["bmi1"] + np.abs(rng.normal(0, 0.06, n))
    S["sbp0"] = 118 + 0.45 * (S["age0"] - 50) + 4 * afr + 0.4 * (S["bmi0"] - 28) + 5 * m["sbp"] * g["sbp"] + rng.normal(0, 13, n)
    S["sbp1"] = rng.normal(0.6, 0.9, n)
    S["ldl0"] = 115 + 15 * m["ldl"] * g["ldl"] + rng.normal(0, 28, n)
    S["ldl1"] = rng.normal(0.5, 2.0, n)
    S["egfr0"] = np.clip(100 - 0.8 * (S["age0"] - 40), 45, 120) + rng.normal(0, 12, n)
    S["egfr1"] = 0.5 + 0.6 * np.maximum(S["a1c0"] - 5.5, 0) + rng.gamma(2.0, 0.4, n)
    # smoking: 0 never, 1 former, 2 current; pack-years at record start, growing if current
    S["smoke"] = rng.choice(3, n, p=[0.55, 0.27, 0.18])
    ppd = rng.gamma(2.0, 0.4, n)
    S["ppd"] = np.where(S["smoke"] == 2, ppd, 0.0)
    S["py0"] = np.where(S["smoke"] > 0, ppd * rng.uniform(0.3, 1.0, n) * (S["age0"] - 17), 0.0)
    S["drug_u"] = rng.random(n)  # which drug of a class this subject is usually prescribed
    for trait in GENETIC_TRAITS:
        S["g_" + trait] = g[trait]
        S["m_" + trait] = m[trait]
    # comorbidity onset times (days since epoch; -inf = before record start)
    t0 = S["t0"]
    S["on_htn"] = _crossing(S["sbp0"], S["sbp1"], 140, t0)
    S["on_obesity"] = _crossing(S["bmi0"], S["bmi1"], 30, t0)
    S["on_hld"] = _crossing(S["ldl0"], S["ldl1"], 160, t0)
    S["on_ckd"] = _crossing(S["egfr0"], -S["egfr1"], 60, t0, above=False)
    cur, former = (S["smoke"] == 2).astype(float), (S["smoke"] == 1).astype(float)
    a_af = np.log(0.0035) + 0.5 * m["af"] * g["af"] + 0.035 * (S["bmi0"] - 28) + 0.3 * (S["sbp0"] >= 140)
    a_cad = (np.log(0.004) + 0.006 * (S["ldl0"] - 115) + 0.5 * cur + 0.3 * (S["sbp0"] >= 140)
             + 0.2 * (S["a1c0"] - 5.4) + 0.4 * m["cad"] * g["cad"] - 0.3 * fem)
    S["on_af"] = S["birth"] + _gompertz_onset(rng, np.full(n, 18.0), a_af, 0.09) * YEAR
    S["on_cad"] = S["birth"] + _gompertz_onset(rng, np.full(n, 18.0), a_cad, 0.07) * YEAR
    S["on_depression"] = S["birth"] + (18 + rng.exponential(1 / (0.012 * (1 + 0.6 * fem)))) * YEAR
    a_death = np.log(0.004) + 0.5 * cur + 0.25 * former + 0.3 * (S["a1c0"] > 6.5) + 0.2 * (S["sbp0"] > 150)
    death = S["birth"] + _gompertz_onset(rng, S["age0"], a_death, 0.085) * YEAR
    ltfu = t0 + rng.exponential(25 * YEAR, n)
    S["t_end"] = np.minimum(np.minimum(death, ltfu), _ADMIN_END)
    S["died"] = death <= np.minimum(ltfu, _ADMIN_END)
    return S


def _trajectories(S: dict, idx: np.ndarray | slice, t: np.ndarray) -> dict[str, np.ndarray]:
    """Latent values at absolute times t (days) for subjects idx (broadcast together)."""
    y = (t - S["t0"][idx]) / YEAR
    out = {
        "age": S["age0"][idx] + y,
        "bmi": np.clip(S["bmi0"][idx] + S["bmi1"][idx] * y, 15, 70),
        "sbp": np.clip(S["sbp0"][idx] + S["sbp1"][idx] * y, 85, 230),
        "ldl": np.clip(S["ldl0"][idx] + S["ldl1"][idx] * y, 30, 300),
        "egfr": np.clip(S["egfr0"][idx] - S["egfr1"][idx] * y, 5, 140),
        "py": S["py0"][idx] + S["ppd"][idx] * np.maximum(y, -S["py0"][idx] / np.maximum(S["ppd"][idx], 1e-9)),
    }
    out["a1c"] = np.clip(S["a1c0"][idx] + S["a1c1"][idx] * y + 0.04 * (out["bmi"] - S["bmi0"][idx]), 4.0, 14.0)
    return out


# Intercepts tuned so that 2-year label prevalences land near the project's targets.
_TASK_ALPHA = {"t2d": -3.35, "stroke": -5.1, "copd": -4.8}


def _log_hazard(S: dict, idx, t: np.ndarray, task: str) -> np.ndarray:
    """Non-genetic log hazard (per year) of a task disease at times t: a function of latent state only."""
    x = _trajectories(S, idx, t)
    age = x["age"]
    if task == "t2d":
        return _TASK_ALPHA[task] + 1.9 * (x["a1c"] - 5.7) + 0.05 * (x["bmi"] - 28) + 0.03 * (age - 50)
    if task == "stroke":
        af = (t >= S["on_af"][idx]).astype(float)
        cad = (t >= S["on_cad"][idx]).astype(float)
        cur = (S["smoke"][idx] == 2).astype(float)
        return (_TASK_ALPHA[task] + 0.08 * (age - 50) + 0.03 * (x["sbp"] - 130) + 1.1 * af + 0.5 * cad
                + 0.35 * (x["a1c"] - 5.7) + 0.5 * cur)
    cur, former = (S["smoke"][idx] == 2).astype(float), (S["smoke"][idx] == 1).astype(float)
    return _TASK_ALPHA[task] + 1.3 * cur + 0.6 * former + 0.02 * x["py"] + 0.075 * (age - 50)


def _hazard_grid(S: dict, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell boundaries (n, C+1) in absolute days, hazard per year on each cell (n, C), cumulative L (n, C+1)."""
    n = len(S["t0"])
    start18 = S["birth"] + 18 * YEAR
    pre = start18[:, None] + (S["t0"] - start18)[:, None] * np.linspace(0, 1, _N_PRE + 1)[None, :]
    rec = S["t0"][:, None] + _CELL * np.arange(1, _N_CELLS + 1)[None, :]
    bounds = np.concatenate([pre, rec], axis=1)
    mid = 0.5 * (bounds[:, 1:] + bounds[:, :-1])
    h = np.exp(_log_hazard(S, np.arange(n)[:, None], mid, task))
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(h * np.diff(bounds, axis=1) / YEAR, axis=1)], axis=1)
    return bounds, h, cum


def _cum_at(bounds, h, cum, rows: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Cumulative non-genetic hazard L(t) for subject rows at record times t (>= record start)."""
    cell = _N_PRE + np.clip(((t - bounds[rows, _N_PRE]) // _CELL).astype(np.int64), 0, _N_CELLS - 1)
    return cum[rows, cell] + h[rows, cell] * (t - bounds[rows, cell]) / YEAR


def _sample_onset(rng, bounds, h, cum, gen_factor) -> np.ndarray:
    """Onset time (days) by inverting the cumulative hazard; inf if beyond the grid."""
    target = rng.exponential(1.0, len(gen_factor)) / gen_factor
    k = (cum < target[:, None]).sum(axis=1) - 1  # last boundary below target
    beyond = k >= cum.shape[1] - 1
    k = np.clip(k, 0, cum.shape[1] - 2)
    r = np.arange(len(k))
    t = bounds[r, k] + (target - cum[r, k]) / h[r, k] * YEAR
    return np.where(beyond, np.inf, t)


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(40)
_GH_W = _GH_W / _GH_W.sum()


def _truth(l_start: np.ndarray, l_end: np.ndarray, coef: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P(onset in (t, t+H] | no onset by t) with the genetic term, and with it integrated out.

    Without genetics, the liability is averaged over its N(0,1) prior reweighted by survival to t
    (Gauss-Hermite quadrature): the best prediction from the non-genetic latent state alone.
    """
    p = -np.expm1(-np.exp(coef * g) * (l_end - l_start))
    f = np.exp(coef[:, None] * _GH_X[None, :])  # (rows, nodes)
    surv_t = np.exp(-f * l_start[:, None])
    surv_h = np.exp(-f * l_end[:, None])
    p0 = ((surv_t - surv_h) @ _GH_W) / np.maximum(surv_t @ _GH_W, 1e-300)
    return p, p0


# ----------------------------------------------------------------------------- the record
_RACES = ["Race/White", "Race/Black or African American", "Race/Asian", "Race/Middle Eastern or North African",
          "Race/More than one population", "Race/None of these"]
_RACE_P = np.array([  # rows: ANCESTRIES order
    [0.03, 0.88, 0.00, 0.00, 0.05, 0.04], [0.35, 0.03, 0.00, 0.00, 0.12, 0.50], [0.02, 0.00, 0.93, 0.00, 0.04, 0.01],
    [0.93, 0.01, 0.00, 0.01, 0.03, 0.02], [0.45, 0.01, 0.00, 0.45, 0.05, 0.04], [0.02, 0.00, 0.90, 0.00, 0.05, 0.03]])
_HISPANIC_P = np.array([0.03, 0.85, 0.02, 0.03, 0.03, 0.02])
# Zipf-like frequency ranks for the background vocabularies (fixed across cohorts).
_zipf_rng = np.random.default_rng(20240101)


def _zipf_p(k: int, s: float = 1.1) -> np.ndarray:
    p = 1.0 / (_zipf_rng.permutation(k) + 2.0) ** s
    return p / p.sum()


_BG_DX_P, _BG_RX_P, _BG_CPT_P, _BG_LAB_P = (_zipf_p(len(a)) for a in (_BG_DX_IDX, _BG_RX_IDX, _BG_CPT_IDX, _BG_LAB_IDX))
_STATIC_T = np.iinfo(np.int64).min  # sort key of rows with a null time: first
# order of events sharing a timestamp: visit start, content, visit end, death
_R_START, _R_BODY, _R_END, _R_DEATH = 0, 1, 2, 3


class _Events:
    """Columns of a shard's events, gathered from vectorised parts and sorted once."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, rows, t_us, code, value=None, rank=_R_BODY) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        k = len(rows)
        if k == 0:
            return
        value = np.full(k, np.nan, np.float32) if value is None else np.asarray(value, np.float32)
        self.parts.append((rows, np.broadcast_to(np.asarray(t_us, np.int64), (k,)),
                           np.broadcast_to(np.asarray(code, np.int64), (k,)), value,
                           np.broadcast_to(np.int8(rank), (k,))))

    def sorted(self) -> tuple[np.ndarray, ...]:
        rows, t, code, val, rank = (np.concatenate([p[i] for p in self.parts]) for i in range(5))
        order = np.lexsort((rank, t, rows))  # stable: ties keep insertion order -> deterministic
        return rows[order], t[order], code[order], val[order]


def _to_us(days: np.ndarray) -> np.ndarray:
    """Days since 1970 -> microseconds, floored to the minute (record times look like real timestamps)."""
    return np.floor(np.asarray(days) * 1440).astype(np.int64) * 60_000_000


def _pick(rng, codes: list[str], k: int, weights=None) -> np.ndarray:
    """k codes (indices) from a list; the first codes are the commonest."""
    idx = _ci(codes)
    if weights is None:
        weights = 1.0 / np.arange(1, len(idx) + 1) ** 1.5
    return idx[rng.choice(len(idx), k, p=np.asarray(weights) / np.sum(weights))]


def _visits(rng, S: dict, onset: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Visit starts/ends/types: a baseline visit, yearly Poisson visits whose rate rises with the
    latent illness burden, diagnosis visits at task onsets, more visits after a task diagnosis,
    and a last visit at the end of observation (so the end of the data is visible)."""
    n = len(S["t0"])
    rows = np.arange(n)
    n_years = int(math.ceil((_ADMIN_END - _START_MIN) / YEAR))
    starts = S["t0"][:, None] + YEAR * np.arange(n_years)[None, :]
    length = np.maximum(np.minimum(starts + YEAR, S["t_end"][:, None]) - starts, 0)
    mid = starts + length / 2
    x = _trajectories(S, rows[:, None], mid)
    burden = sum((mid >= S["on_" + c][:, None]).astype(float) for c in COMORBIDITIES)
    base = rng.gamma(2.0, 0.35, n)
    rate = base[:, None] * np.exp(0.15 * burden + 0.35 * np.clip(x["a1c"] - 6, 0, 3) + 0.012 * (x["age"] - 50))
    counts = rng.poisson(rate * length / YEAR).ravel()
    v_rows = [np.repeat(np.repeat(rows, n_years), counts)]
    v_t = [np.repeat(starts.ravel(), counts) + rng.random(counts.sum()) * np.repeat(length.ravel(), counts)]
    # kind: -1 regular, -2 baseline, -3 final, -4 follow-up after a task diagnosis, k = diagnosis of task k
    v_kind = [np.full(counts.sum(), -1)]
    v_rows.append(rows)
    v_t.append(S["t0"] + rng.uniform(8 / 24, 17 / 24, n))
    v_kind.append(np.full(n, -2))
    extra = {"t2d": 0.6, "stroke": 1.0, "copd": 0.8}
    for k, task in enumerate(TASKS):
        on = onset[task]
        diag = (on >= S["t0"]) & (on < S["t_end"])
        v_rows.append(rows[diag]), v_t.append(on[diag]), v_kind.append(np.full(diag.sum(), k))
        after = np.maximum(on, S["t0"])
        cnt = rng.poisson(extra[task] * np.maximum(S["t_end"] - after, 0) / YEAR * (on < S["t_end"]))
        r = np.repeat(rows, cnt)
        v_rows.append(r), v_t.append(after[r] + rng.random(len(r)) * (S["t_end"] - after)[r]), v_kind.append(np.full(len(r), -4))
    alive = ~S["died"]
    v_rows.append(rows[alive]), v_t.append(S["t_end"][alive] - 1 / 24), v_kind.append(np.full(alive.sum(), -3))
    vr, vt, vk = np.concatenate(v_rows), np.concatenate(v_t), np.concatenate(v_kind)
    keep = vt < S["t_end"][vr]
    vr, vt, vk = vr[keep], vt[keep], vk[keep]
    order = np.lexsort((vt, vr))
    vr, vt, vk = vr[order], vt[order], vk[order]
    # visit type: sicker subjects are admitted more; diagnosis visits by disease
    burden_v = sum((vt >= S["on_" + c][vr]).astype(float) for c in COMORBIDITIES)
    u = rng.random(len(vr))
    p_ip, p_er = 0.02 * np.exp(0.25 * burden_v), 0.07 * np.exp(0.15 * burden_v)
    vtype = np.where(u < p_ip, 1, np.where(u < p_ip + p_er, 2, 0))  # 0 OP, 1 IP, 2 ER
    vtype = np.where(vk == TASKS.index("stroke"), 1, vtype)
    vtype = np.where(vk == TASKS.index("copd"), np.where(u < 0.3, 2, 0), vtype)
    vtype = np.where((vk == TASKS.index("t2d")) | (vk <= -2), 0, vtype)
    # routine outpatient visits happen in office hours (only routine ones: moving a follow-up
    # visit could put it before the diagnosis it follows)
    day = np.floor(vt) + rng.uniform(8 / 24, 17 / 24, len(vt))
    vt = np.where((vk == -1) & (vtype == 0) & (day < S["t_end"][vr]), day, vt)
    dur = np.select([vtype == 0, vtype == 2], [rng.uniform(15, 90, len(vr)) / 1440, rng.uniform(2, 12, len(vr)) / 24],
                    1 + rng.gamma(2.0, 1.5, len(vr)))
    start_us = _to_us(vt)
    end_us = np.maximum(np.minimum(_to_us(vt + dur), _to_us(S["t_end"])[vr]), start_us)
    return {"rows": vr, "t": vt, "kind": vk, "type": vtype, "start_us": start_us, "end_us": end_us}


def _record(rng, S: dict, onset: dict[str, np.ndarray], V: dict) -> _Events:
    """All events of a shard: static rows, birth/death, and each visit's codes and measurements."""
    n = len(S["t0"])
    ev = _Events()
    rows = np.arange(n)
    ev.add(rows, _STATIC_T, np.where(S["female"], _CI["Gender/F"], _CI["Gender/M"]))
    race = (rng.random(n)[:, None] > np.cumsum(_RACE_P, axis=1)[S["anc"]]).sum(axis=1)
    ev.add(rows, _STATIC_T, _ci(_RACES)[np.minimum(race, len(_RACES) - 1)])
    hisp = rng.random(n) < _HISPANIC_P[S["anc"]]
    ev.add(rows, _STATIC_T, np.where(hisp, _CI["Ethnicity/Hispanic or Latino"], _CI["Ethnicity/Not Hispanic or Latino"]))
    ev.add(rows, _to_us(S["birth"]), _CI[BIRTH_CODE], rank=_R_START)
    ev.add(rows[S["died"]], _to_us(S["t_end"][S["died"]]), _CI[DEATH_CODE], rank=_R_DEATH)

    vr, vt, vk, vtype, t_us = V["rows"], V["t"], V["kind"], V["type"], V["start_us"]
    nv = len(vr)
    ev.add(vr, t_us, _ci(list(VISIT_START_CODES.values()))[vtype], rank=_R_START)
    ev.add(vr, V["end_us"], _CI[VISIT_END_CODE], rank=_R_END)
    op = vtype == 0
    x = _trajectories(S, vr, vt)

    def some(p):  # visits where a thing happens with probability p (scalar or per visit)
        return np.flatnonzero(rng.random(nv) < p)

    # visit-level billing codes
    cpt = np.where(op, _pick(rng, ["CPT4/99213", "CPT4/99214", "CPT4/99215"], nv),
                   np.where(vtype == 2, _pick(rng, ["CPT4/99283", "CPT4/99284", "CPT4/99285"], nv, [1, 1, 1]), _CI["CPT4/99223"]))
    prev = op & (rng.random(nv) < 0.1)
    cpt = np.where(prev, np.where(x["age"] >= 65, _CI["CPT4/99397"], _CI["CPT4/99396"]), cpt)
    ev.add(vr, t_us, cpt)

    # conditions: comorbidities (latent onsets) and tasks (sampled onsets); codes recur after onset
    active = {c: vt >= S["on_" + c][vr] for c in COMORBIDITIES}
    first_visit = vk == -2
    for k, task in enumerate(TASKS):
        on = onset[task][vr]
        active[task] = (vt >= on) | (vk == k)
    for name, (codes, p_code, drugs, p_drug) in {**COMORBIDITIES, **TASK_CONDITIONS}.items():
        act = active[name]
        forced = (vk == TASKS.index(name)) if name in TASKS else np.zeros(nv, bool)
        forced |= act & first_visit & (onset[name][vr] < S["t0"][vr] if name in TASKS else True)
        hit = np.flatnonzero(forced | (act & (rng.random(nv) < p_code)))
        ev.add(vr[hit], t_us[hit], _pick(rng, codes, len(hit)))
        # treatment: each subject has a preferred drug per condition
        pref = _ci(drugs)[(S["drug_u"][vr] * len(drugs)).astype(int) % len(drugs)]
        rx = np.flatnonzero(act & (rng.random(nv) < np.where(forced, max(p_drug, 0.9), p_drug)))
        other = _pick(rng, drugs, len(rx))
        ev.add(vr[rx], t_us[rx], np.where(rng.random(len(rx)) < 0.75, pref[rx], other))
    stroke_hist = np.flatnonzero(active["stroke"] & (vk != TASKS.index("stroke")) & (rng.random(nv) < 0.3))
    ev.add(vr[stroke_hist], t_us[stroke_hist], _CI["ICD10CM/Z86.73"])
    for k, task in enumerate(TASKS):
        d = np.flatnonzero(vk == k)
        for code in ONSET_PROCEDURES[task]:
            ev.add(vr[d], t_us[d], _CI[code])

    # vitals: noisy readouts of the latent state; treatment lowers what is measured
    vit = some(np.where(op, 0.45, 0.9))
    ev.add(vr[vit], t_us[vit], _CI[MEASUREMENT_CODES["bmi"]], x["bmi"][vit] + rng.normal(0, 0.7, len(vit)))
    wt = some(np.where(op, 0.3, 0.8))
    ev.add(vr[wt], t_us[wt], _CI[MEASUREMENT_CODES["weight"]], x["bmi"][wt] * S["height"][vr[wt]] ** 2 + rng.normal(0, 1.5, len(wt)))
    bp = some(np.where(op, 0.5, 0.95))
    sbp = x["sbp"][bp] - 10 * active["htn"][bp] + rng.normal(0, 9, len(bp))
    ev.add(vr[bp], t_us[bp], _CI[MEASUREMENT_CODES["sbp"]], np.round(sbp))
    ev.add(vr[bp], t_us[bp], _CI[MEASUREMENT_CODES["dbp"]], np.round(0.5 * sbp + 15 + rng.normal(0, 6, len(bp))))
    hr = some(np.where(op, 0.25, 0.95))
    ev.add(vr[hr], t_us[hr], _CI[MEASUREMENT_CODES["heart_rate"]], np.round(rng.normal(74, 10, len(hr)) + 10 * active["af"][hr]))
    # labs: HbA1c is ordered more when it is high; T2D treatment lowers the measured value
    a1c_seen = x["a1c"] - 0.8 * active["t2d"]
    a1c = some(0.03 + 0.2 * (x["a1c"] > 5.9) + 0.45 * active["t2d"] + 0.5 * (vk == 0))
    ev.add(vr[a1c], t_us[a1c], _CI[MEASUREMENT_CODES["hba1c"]], np.round(a1c_seen[a1c] + rng.normal(0, 0.15, len(a1c)), 1))
    bmp = some(np.where(op, 0.08, 0.7) + 0.1 * active["ckd"])
    ev.add(vr[bmp], t_us[bmp], _CI["CPT4/80048"])
    ev.add(vr[bmp], t_us[bmp], _CI[MEASUREMENT_CODES["glucose"]], np.round(28.7 * a1c_seen[bmp] - 46.7 + rng.normal(0, 15, len(bmp))))
    egfr = np.clip(x["egfr"][bmp] + rng.normal(0, 5, len(bmp)), 3, 150)
    ev.add(vr[bmp], t_us[bmp], _CI[MEASUREMENT_CODES["egfr"]], np.round(egfr))
    ev.add(vr[bmp], t_us[bmp], _CI[MEASUREMENT_CODES["creatinine"]], np.round((egfr / 90) ** -1.1 * (0.8 + 0.2 * ~S["female"][vr[bmp]]), 2))
    for code in ("2951-2", "2823-3", "3094-0"):  # sodium, potassium, urea nitrogen in the same panel
        j = list(_BG_LAB_IDX).index(_CI["LOINC/" + code])
        ev.add(vr[bmp], t_us[bmp], _BG_LAB_IDX[j], np.round(rng.normal(_BG_LAB_MEAN[j], _BG_LAB_SD[j], len(bmp)), 1))
    lip = some(0.05 + 0.2 * (active["hld"] | active["cad"] | active["t2d"]))
    ev.add(vr[lip], t_us[lip], _CI["CPT4/80061"])
    statin = active["hld"] | active["cad"] | active["stroke"]
    ev.add(vr[lip], t_us[lip], _CI[MEASUREMENT_CODES["ldl"]], np.round(x["ldl"][lip] - 45 * statin[lip] + rng.normal(0, 12, len(lip))))
    # smoking: status, pack-years, nicotine codes
    status = _ci([SMOKING_CODES[s] for s in ("never", "former", "current")])[S["smoke"][vr]]
    sm = some(np.where(op, 0.15, 0.5))
    ev.add(vr[sm], t_us[sm], status[sm])
    py = np.flatnonzero((S["smoke"][vr] > 0) & (rng.random(nv) < 0.05))
    ev.add(vr[py], t_us[py], _CI[MEASUREMENT_CODES["pack_years"]], np.round(np.maximum(x["py"][py] + rng.normal(0, 3, len(py)), 0)))
    cur = np.flatnonzero((S["smoke"][vr] == 2) & (rng.random(nv) < 0.25))
    ev.add(vr[cur], t_us[cur], _CI["ICD10CM/F17.210"])
    nic = np.flatnonzero((S["smoke"][vr] == 2) & (rng.random(nv) < 0.04))
    ev.add(vr[nic], t_us[nic], _pick(rng, ["RxNorm/7407", "RxNorm/591622"], len(nic)))
    fmr = np.flatnonzero((S["smoke"][vr] == 1) & (rng.random(nv) < 0.15))
    ev.add(vr[fmr], t_us[fmr], _CI["ICD10CM/Z87.891"])
    # prodromes: functions of the latent (non-genetic) state, never of the future onset draw
    pre = some(0.3 * ((x["a1c"] >= 5.7) & (x["a1c"] < 6.5) & ~active["t2d"]))
    ev.add(vr[pre], t_us[pre], _CI["ICD10CM/R73.03"])
    h_stroke = np.exp(_log_hazard(S, vr, vt, "stroke"))
    tia = some(np.minimum(0.3, 2.0 * h_stroke) * ~active["stroke"])
    ev.add(vr[tia], t_us[tia], _CI["ICD10CM/G45.9"])
    h_copd = np.exp(_log_hazard(S, vr, vt, "copd"))
    resp = some(np.minimum(0.5, 3.0 * h_copd) * ~active["copd"])
    ev.add(vr[resp], t_us[resp], _pick(rng, ["ICD10CM/R06.02", "ICD10CM/R05.9", "ICD10CM/J20.9"], len(resp)))
    ecg = some(0.02 + 0.15 * active["af"] + 0.05 * active["cad"])
    ev.add(vr[ecg], t_us[ecg], _CI["CPT4/93000"])
    echo = some(0.03 * (active["af"] | active["cad"]))
    ev.add(vr[echo], t_us[echo], _pick(rng, ["CPT4/93306", "CPT4/93015"], len(echo)))
    # long-tailed background codes
    for idx, p, lam in ((_BG_DX_IDX, _BG_DX_P, np.where(op, 0.5, 1.2)), (_BG_RX_IDX, _BG_RX_P, np.where(op, 0.2, 0.8)),
                        (_BG_CPT_IDX, _BG_CPT_P, np.where(op, 0.15, 0.5))):
        r = np.repeat(np.arange(nv), rng.poisson(lam))
        ev.add(vr[r], t_us[r], idx[rng.choice(len(idx), len(r), p=p)])
    r = np.repeat(np.arange(nv), rng.poisson(np.where(op, 0.2, 1.0)))
    j = rng.choice(len(_BG_LAB_IDX), len(r), p=_BG_LAB_P)
    val = np.maximum(rng.normal(_BG_LAB_MEAN[j], _BG_LAB_SD[j]), 0)
    ev.add(vr[r], t_us[r], _BG_LAB_IDX[j], np.round(val, 1))
    return ev


# ----------------------------------------------------------------------------- one shard
def _genetics(rng, design: _PrsDesign, anc: np.ndarray, genotyped: np.ndarray) -> tuple[dict, np.ndarray]:
    """Genetic liabilities of every subject, and raw PRS scores (n_prs, n_genotyped) of the genotyped.

    Scores are block-correlated standard normals z (one factor per block) mapped to raw scale
    by ancestry: raw = mean[ancestry] + scale[ancestry] * z. A trait's liability is the
    standardised sum of its carrier columns' z, so the PRS table carries it exactly.
    """
    n, n_prs = len(anc), len(design.col_block)
    sqrt_1m = np.sqrt(1 - design.sqrt_lam.astype(np.float64) ** 2).astype(np.float32)
    factors = rng.standard_normal((design.n_blocks, n), dtype=np.float32)  # (blocks, n)
    car = np.concatenate(list(design.carriers.values()))
    z_car = factors[design.col_block[car]] * design.sqrt_lam[car, None] + rng.standard_normal((len(car), n), dtype=np.float32) * sqrt_1m[car, None]
    g, off = {}, 0
    for trait, cols in design.carriers.items():
        g[trait] = z_car[off:off + len(cols)].astype(np.float64).sum(axis=0) / design.carrier_norm[trait]
        off += len(cols)
    gi = np.flatnonzero(genotyped)
    z = factors[:, gi][design.col_block]  # (n_prs, n_g)
    z *= design.sqrt_lam[:, None]
    z += rng.standard_normal((n_prs, len(gi)), dtype=np.float32) * sqrt_1m[:, None]
    z[car] = z_car[:, gi]
    a = anc[gi]
    raw = design.mean.T.astype(np.float32)[:, a] + design.scale.T.astype(np.float32)[:, a] * z
    return g, raw


def _subject_ids(rng, n: int, shard: int) -> np.ndarray:
    """Sorted, unique, non-contiguous int64 ids; the shard index in the low bits keeps shards disjoint."""
    ids = np.unique(rng.integers(10**9, 10**15, n + 16))
    while len(ids) < n:
        ids = np.unique(np.concatenate([ids, rng.integers(10**9, 10**15, n)]))
    return np.sort(rng.permutation(ids)[:n]) * 1024 + shard


def _labels(rng, S, V, rows, t, code, grids, g, horizon_us: int, task: str) -> dict[str, np.ndarray]:
    """New-onset labels of one task: one random visit end per eligible subject, and its true risk."""
    n = len(S["t0"])
    task_codes = np.array([i for i, (c, _) in enumerate(CODEBOOK) if c.startswith(TASK_CODE_PREFIXES[task])])
    m = np.isin(code, task_codes)
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, rows[m], t[m])
    t0_us, tend_us = _to_us(S["t0"]), _to_us(S["t_end"])
    vr, ve = V["rows"], V["end_us"]
    # Candidate prediction times: ends of visits whose occurrence does not depend on any onset
    # draw (routine and baseline visits), after MIN_HISTORY_DAYS of record, with the whole horizon observed.
    # One is drawn per subject *before* looking at the outcome, then the subject is dropped if the
    # condition is coded at or before it (new onset). Choosing among visits before onset instead
    # would pull prediction times towards onsets and inflate prevalence above the true risk.
    ok = (V["kind"] >= -2) & (V["kind"] < 0) & (ve >= t0_us[vr] + MIN_HISTORY_DAYS * DAY_US) & (ve + horizon_us <= tend_us[vr])
    idx = np.flatnonzero(ok)
    order = np.lexsort((rng.random(len(idx)), vr[idx]))
    idx = idx[order]
    last = np.r_[vr[idx][1:] != vr[idx][:-1], True]
    chosen = idx[last]
    chosen = chosen[ve[chosen] < first[vr[chosen]]]
    r, tau = vr[chosen], ve[chosen]
    positive = first[r] <= tau + horizon_us
    bounds, h, cum = grids[task]
    l0 = _cum_at(bounds, h, cum, r, tau / DAY_US)
    l1 = _cum_at(bounds, h, cum, r, (tau + horizon_us) / DAY_US)
    coef = GENETIC_LOG_HR[task] * S["m_" + task][r]
    p, p0 = _truth(l0, l1, coef, g[task][r])
    return {"rows": r, "prediction_time": tau, "boolean_value": positive, "true_probability": p, "true_probability_no_genetic": p0}


def _simulate_shard(seed: int, shard: int, n: int, design: _PrsDesign, horizon_days: int,
                    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict:
    """Generate one shard of subjects end to end from its own seeded Generator (byte-identical reruns)."""
    rng = np.random.default_rng([seed, shard])
    ids = _subject_ids(rng, n, shard)
    anc = rng.choice(len(ANCESTRIES), n, p=ANCESTRY_P / ANCESTRY_P.sum())
    genotyped = rng.random(n) < GENOTYPED_FRACTION
    u = rng.random(n)
    f_train, f_tuning = split_fractions[0], split_fractions[0] + split_fractions[1]
    split = np.where(u < f_train, 0, np.where(u < f_tuning, 1, 2))
    g, prs_raw = _genetics(rng, design, anc, genotyped)
    S = _latent_subjects(rng, n, design, g, anc)
    onset, grids = {}, {}
    for task in TASKS:
        grids[task] = _hazard_grid(S, task)
        factor = np.exp(GENETIC_LOG_HR[task] * S["m_" + task] * g[task])
        onset[task] = _sample_onset(rng, *grids[task], factor)
    V = _visits(rng, S, onset)
    rows, t, code, val = _record(rng, S, onset, V).sorted()
    labels = {task: _labels(rng, S, V, rows, t, code, grids, g, horizon_days * DAY_US, task) for task in TASKS}
    return {"ids": ids, "anc": anc, "genotyped": genotyped, "split": split, "S": S, "onset": onset,
            "prs": prs_raw, "events": (rows, t, code, val), "labels": labels}


# ----------------------------------------------------------------------------- writing


def _event_table(ids, rows, t, code, val) -> pa.Table:
    import pyarrow as pa

    schema = pa.schema([("subject_id", pa.int64(), False), ("time", pa.timestamp("us")),
                        ("code", pa.string(), False), ("numeric_value", pa.float32())])
    code_strings = pa.array([c for c, _ in CODEBOOK], pa.string())  # code index -> MEDS code
    static = t == _STATIC_T
    return pa.Table.from_arrays([
        pa.array(ids[rows], pa.int64()),
        pa.array(np.where(static, 0, t), pa.timestamp("us"), mask=static),
        pa.DictionaryArray.from_arrays(pa.array(code.astype(np.int32)), code_strings).cast(pa.string()),
        pa.array(val, pa.float32(), mask=np.isnan(val)),
    ], schema=schema)


def _prs_table(ids, anc, raw: np.ndarray, names: list[str]) -> pa.Table:
    import pyarrow as pa

    cols = [pa.array(ids, pa.int64()), pa.array(np.array(ANCESTRIES)[anc], pa.string())]
    cols += [pa.array(raw[j]) for j in range(raw.shape[0])]
    return pa.Table.from_arrays(cols, names=["subject_id", "ancestry", *names])


def _codes_table() -> pa.Table:
    import pyarrow as pa

    parents = [[c.split(".")[0]] if c.startswith("ICD10CM/") and "." in c else None for c, _ in CODEBOOK]
    return pa.table({"code": [c for c, _ in CODEBOOK], "description": [d for _, d in CODEBOOK],
                     "parent_codes": pa.array(parents, pa.list_(pa.string()))})


def _prs_traits_json(design: _PrsDesign, names: list[str]) -> dict:
    traits = {}
    for trait, cols in design.carriers.items():
        traits[trait] = {
            "columns": [names[j] for j in cols],
            "block_columns": [names[j] for j in np.flatnonzero(design.col_block == GENETIC_TRAITS.index(trait))],
            "effect_multiplier_by_ancestry": design.portability[trait],
            "log_hazard_ratio_per_sd": GENETIC_LOG_HR.get(trait),
            "raw_mean_by_ancestry": {a: design.mean[i, cols].tolist() for i, a in enumerate(ANCESTRIES)},
            "raw_scale_by_ancestry": {a: design.scale[i, cols].tolist() for i, a in enumerate(ANCESTRIES)},
            "loading": (design.sqrt_lam[cols].astype(float)).tolist(),
            "sum_sd": design.carrier_norm[trait],
        }
    return {
        "liability": "g = sum_j z_j / sum_sd over the trait's columns, z_j = (raw_j - raw_mean[ancestry]) / raw_scale[ancestry]; "
                     "g ~ N(0,1). Task hazards are multiplied by exp(log_hazard_ratio_per_sd * effect_multiplier[ancestry] * g); "
                     "bmi, sbp, ldl shift those latent levels and af, cad their onset hazards.",
        "traits": traits,
    }


def _subjects_table(res: dict) -> pa.Table:
    import pyarrow as pa

    S, on = res["S"], res["onset"]
    cols = {"subject_id": pa.array(res["ids"]), "ancestry": np.array(ANCESTRIES)[res["anc"]],
            "genotyped": res["genotyped"], "sex": np.where(S["female"], "F", "M"),
            "birth": pa.array(_to_us(S["birth"]), pa.timestamp("us")), "split": np.array(SPLITS)[res["split"]],
            "record_start": pa.array(_to_us(S["t0"]), pa.timestamp("us")),
            "record_end": pa.array(_to_us(S["t_end"]), pa.timestamp("us")), "died": S["died"]}
    for k in ("bmi0", "bmi1", "a1c0", "a1c1", "sbp0", "sbp1", "ldl0", "ldl1", "egfr0", "egfr1", "py0", "ppd", "height"):
        cols[k] = S[k]
    cols["smoking"] = np.array(["never", "former", "current"])[S["smoke"]]
    for trait in GENETIC_TRAITS:
        cols["g_" + trait] = S["g_" + trait]
    # onset times in days since 1970 (-inf: before the record; inf: never in the simulated span)
    for c in COMORBIDITIES:
        cols[f"onset_{c}_days"] = S["on_" + c]
    for task in TASKS:
        cols[f"onset_{task}_days"] = on[task]
    return pa.table(cols)


@dataclass
class SimulationSummary:
    """What `simulate_cohort` wrote (also returned as a dict by `as_dict`)."""

    out: str
    n_subjects: int
    n_events: int
    n_genotyped: int
    split_counts: dict[str, int]
    labels: dict[str, dict[str, float]]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def simulate_cohort(out: str | Path, n_subjects: int = 20_000, seed: int = 0, n_prs: int = 3481,
                    horizon_days: int = 730, shard_size: int = 5000, progress: bool = True,
                    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), overwrite: bool = False) -> dict:
    """Write a simulated All-of-Us-like cohort (MEDS, PRS, labels, truth) under `out`; return a summary dict.

    `split_fractions` (train, tuning, held_out) sum to 1; a larger held_out share gives tighter
    confidence intervals when comparing models (the demo uses 0.6, 0.1, 0.3). An existing `out`
    is replaced only with `overwrite` (--overwrite).
    """
    import meds
    import pyarrow.parquet as pq

    check_output(out, {}, overwrite)
    split_fractions = tuple(float(f) for f in split_fractions)
    if len(split_fractions) != 3 or min(split_fractions) <= 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise InputError(f"--split-fractions must be three positive numbers (train,tuning,held_out) summing to 1, "
                         f"got {','.join(str(f) for f in split_fractions)}")
    if n_subjects < 1:
        raise InputError(f"--subjects must be at least 1, got {n_subjects}")
    if horizon_days < 1:
        raise InputError(f"--horizon-days must be at least 1, got {horizon_days}")
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, got {shard_size}")
    design = _prs_design(seed, n_prs)
    names = [f"PGS{j + 1:06d}" for j in range(n_prs)]
    n_shards = max(min(4, n_subjects), math.ceil(n_subjects / shard_size))  # several shards per split
    sizes = np.diff(np.linspace(0, n_subjects, n_shards + 1).astype(np.int64))
    counters = dict.fromkeys(SPLITS, 0)
    n_events, n_geno = 0, 0
    labels = {task: [] for task in TASKS}
    with atomic_output_dir(out, overwrite) as tmp:
        for s in SPLITS:
            (tmp / "meds" / "data" / s).mkdir(parents=True)
        for d in ("meds/metadata", "labels", "truth"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        prs_writer = None
        parts = tmp / ".subjects"  # per-shard truth tables, merged in subject order at the end
        parts.mkdir()
        part_ids = []
        split_counts = np.zeros(len(SPLITS), dtype=np.int64)
        for shard in tqdm(range(n_shards), desc="simulate: shards", unit="shard", disable=not progress):
            res = _simulate_shard(seed, shard, int(sizes[shard]), design, horizon_days, split_fractions)
            rows, t, code, val = res["events"]
            ev_split = res["split"][rows]
            for k, s in enumerate(SPLITS):
                m = ev_split == k
                if m.any():
                    pq.write_table(_event_table(res["ids"], rows[m], t[m], code[m], val[m]),
                                   tmp / "meds" / "data" / s / f"{counters[s]}.parquet")
                    counters[s] += 1
            n_events += len(rows)
            gi = np.flatnonzero(res["genotyped"])
            n_geno += len(gi)
            prs = _prs_table(res["ids"][gi], res["anc"][gi], res.pop("prs"), names)
            if prs_writer is None:
                prs_writer = pq.ParquetWriter(tmp / "prs.parquet", prs.schema)
            prs_writer.write_table(prs)
            del prs, res["events"]
            for task in TASKS:
                lab = res["labels"][task]
                labels[task].append({"subject_id": res["ids"][lab["rows"]], "split": res["split"][lab["rows"]],
                                     **{k: v for k, v in lab.items() if k != "rows"}})
            _write_part(_subjects_table(res), parts / f"{shard:06d}.arrow")
            part_ids.append(res["ids"])
            split_counts += np.bincount(res["split"], minlength=len(SPLITS))
            del res
        prs_writer.close()
        # The writer holds the footer it built: ~3 MB a row group of 3,481 columns (~600 MB at 1 M
        # subjects); free it before the merge below rather than beside it.
        del prs_writer
        _write_sorted_subjects(sorted(parts.glob("*.arrow")), part_ids, tmp / "truth" / "subjects.parquet",
                               tmp / "meds" / "metadata" / "subject_splits.parquet")
        shutil.rmtree(parts)
        pq.write_table(_codes_table(), tmp / "meds" / "metadata" / "codes.parquet")
        meta = {"dataset_name": "ehr-prs simulated All-of-Us-like cohort", "dataset_version": f"seed={seed},n={n_subjects}",
                "etl_name": "ehr-prs simulate", "etl_version": "0.1.0", "meds_version": meds.__version__,
                # the simulated extract's date, not the wall clock: same seed -> same bytes
                "created_at": "2024-01-01T00:00:00", "license": "CC0-1.0"}
        (tmp / "meds" / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "truth" / "prs_traits.json").write_text(json.dumps(_prs_traits_json(design, names), indent=2) + "\n")
        label_summary = _write_labels(tmp, labels)
    counts = {s: int(k) for s, k in zip(SPLITS, split_counts)}
    summary = SimulationSummary(str(out), n_subjects, n_events, n_geno, counts, label_summary)
    return summary.as_dict()


def _write_part(table: pa.Table, path: Path) -> None:
    """One shard's truth table as an uncompressed arrow file (read back through a memory map)."""
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _write_sorted_subjects(parts: list[Path], part_ids: list[np.ndarray], truth_path: Path, splits_path: Path,
                           rows_per_group: int = SUBJECT_ROW_GROUP) -> None:
    """Merge the per-shard truth tables (each sorted by subject) into truth/subjects.parquet and
    metadata/subject_splits.parquet, sorted by subject, one row group of `rows_per_group` at a time.

    Only the subject ids (8 bytes a subject) and one output row group are in memory: each part
    is memory-mapped and only its rows of the current group are read. A shard's ids interleave
    with every other shard's (the shard number is in their low bits), hence the merge.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sorted_ids = np.sort(np.concatenate(part_ids))
    starts = sorted_ids[::rows_per_group]  # first subject id of each output row group
    cuts = [np.r_[np.searchsorted(ids, starts), len(ids)] for ids in part_ids]  # per part: rows of each group
    split_schema = pa.schema([("subject_id", pa.int64(), False), ("split", pa.string(), False)])
    truth_writer = splits_writer = None
    try:
        for g in range(len(starts)):
            pieces, maps = [], []
            for path, cut in zip(parts, cuts):
                if cut[g + 1] > cut[g]:
                    src = pa.memory_map(str(path))
                    maps.append(src)
                    pieces.append(pa.ipc.open_file(src).read_all().slice(cut[g], cut[g + 1] - cut[g]))
            group = pa.concat_tables(pieces).sort_by("subject_id")  # a copy: the maps can close
            del pieces
            for src in maps:
                src.close()
            if truth_writer is None:
                truth_writer = pq.ParquetWriter(truth_path, group.schema)
                splits_writer = pq.ParquetWriter(splits_path, split_schema)
            truth_writer.write_table(group)
            splits_writer.write_table(pa.table({"subject_id": group["subject_id"], "split": group["split"]},
                                               schema=split_schema))
    finally:
        for w in (truth_writer, splits_writer):
            if w is not None:
                w.close()


def _write_labels(tmp: Path, labels: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """labels/{task}.parquet (MEDS label schema) and truth/{task}.parquet, rows sorted by subject."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    label_schema = pa.schema([("subject_id", pa.int64(), False), ("prediction_time", pa.timestamp("us"), False),
                              ("boolean_value", pa.bool_(), False)])
    out = {}
    for task, parts in labels.items():
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cat["subject_id"], kind="stable")
        cat = {k: v[order] for k, v in cat.items()}
        sid, pt = pa.array(cat["subject_id"], pa.int64()), pa.array(cat["prediction_time"], pa.timestamp("us"))
        pq.write_table(pa.Table.from_arrays([sid, pt, pa.array(cat["boolean_value"])], schema=label_schema),
                       tmp / "labels" / f"{task}.parquet")
        pq.write_table(pa.table({"subject_id": sid, "prediction_time": pt,
                                 "true_probability": cat["true_probability"],
                                 "true_probability_no_genetic": cat["true_probability_no_genetic"]}),
                       tmp / "truth" / f"{task}.parquet")
        y, held = cat["boolean_value"], cat["split"] == 2
        out[task] = {"rows": int(len(y)), "positives": int(y.sum()), "prevalence": float(y.mean()) if len(y) else 0.0,
                     "held_out_rows": int(held.sum()), "held_out_positives": int(y[held].sum())}
    return out


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (written atomically; must not exist yet)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--subjects", type=int, default=20_000, help="number of subjects (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> byte-identical files")
    parser.add_argument("--n-prs", type=int, default=3481, help="number of PRS columns PGS000001... (default 3481)")
    parser.add_argument("--horizon-days", type=int, default=730, help="label horizon in days (default 730)")
    parser.add_argument("--shard-size", type=int, default=5000, help="subjects per generated shard (default 5000)")
    parser.add_argument("--split-fractions", default="0.8,0.1,0.1",
                        help="train,tuning,held_out shares of subjects (default 0.8,0.1,0.1)")


def run(args: argparse.Namespace) -> None:
    summary = simulate_cohort(args.out, n_subjects=args.subjects, seed=args.seed, n_prs=args.n_prs,
                              horizon_days=args.horizon_days, shard_size=args.shard_size,
                              split_fractions=_parse_fractions(args.split_fractions), overwrite=args.overwrite)
    print(format_summary(summary))


def _parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--split-fractions {text!r}: expected three numbers like 0.8,0.1,0.1") from None


def format_summary(summary: dict) -> str:
    out = Path(summary["out"])
    n = summary["n_subjects"]
    lines = [f"wrote a simulated cohort of {n} subjects to {out}",
             f"  meds/        {summary['n_events']} events ({summary['n_events'] / max(n, 1):.1f} per subject); "
             + ", ".join(f"{s} {c}" for s, c in summary["split_counts"].items()) + " subjects",
             f"  prs.parquet  {summary['n_genotyped']} genotyped subjects ({summary['n_genotyped'] / max(n, 1):.1%})"]
    for task, s in summary["labels"].items():
        lines.append(f"  labels/{task}.parquet  {s['rows']} rows, {s['positives']} positive ({s['prevalence']:.1%}); "
                     f"held_out {s['held_out_rows']} rows, {s['held_out_positives']} positive")
    lines.append("  truth/       true probabilities per label row, prs_traits.json, subjects.parquet")
    return "\n".join(lines)
